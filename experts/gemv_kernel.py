"""Decode-sized fp32 products on the CPU (csrc/gemv.c), compiled for this CPU on first use: the routed
SwiGLU experts of a call (ExpertShard) and the router's Linears over a few rows (router/decode_linear.py).

It is plain C with no torch headers: the host's C compiler builds it in well under a second, and it is
called through ctypes, which lets go of the GIL for the call. It is built with -march=native, so the
library's name carries a hash of the source, the flags and this CPU's model and features: hosts that
share a home directory never load each other's build. Where no compiler works, `load_gemv` says why
once and returns None, and everything runs on torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = "gemv.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
# Up to this many rows per weight matrix on average the kernel beats torch's GEMMs: 1.6-2.7x at up to
# 4 rows per active expert, slower from 8 (benchmarks/results/expert_compute-*.json, kernel `gemv`).
MAX_ROWS_PER_MATRIX = 6


class Gemv:
    """The compiled kernels. Weights are [out, in] values over [in, out] memory (gemm_layout.held_as)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._experts = library.swiglu_experts
        self._experts.restype = ctypes.c_int
        self._experts.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
        self._linear = library.linear_rows
        self._linear.restype = None
        self._linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3

    def swiglu_experts(
        self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Per row, down(silu(gate(x)) * up(x)) of the row's expert. x [R, H], rows grouped by expert;
        gate_up [E, 2I, H]; down [E, H, I]; counts [E] int64 rows per expert, summing to R."""
        num, two_i, hidden = gate_up.shape
        _check_memory(gate_up, down)
        if x.dtype != torch.float32 or x.shape[1] != hidden or counts.numel() != num:
            raise ValueError(f"gemv got rows {tuple(x.shape)} {x.dtype} for {num} experts of {hidden}")
        x, counts = x.contiguous(), counts.to(torch.int64).contiguous()
        y = torch.empty_like(x)
        status = self._experts(
            x.data_ptr(), y.data_ptr(), gate_up.data_ptr(), down.data_ptr(), counts.data_ptr(),
            num, hidden, two_i // 2,
        )  # fmt: skip
        if status:
            raise MemoryError("gemv could not allocate its scratch rows")
        return y

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.linear(x, weight) without a bias: x [..., in] fp32, weight [out, in]."""
        _check_memory(weight)
        out, width = weight.shape
        if x.dtype != torch.float32 or x.shape[-1] != width:
            raise ValueError(f"gemv got rows {tuple(x.shape)} {x.dtype} for a weight of {width} inputs")
        rows = x.reshape(-1, width).contiguous()
        y = x.new_empty(*x.shape[:-1], out)
        self._linear(rows.data_ptr(), y.data_ptr(), weight.data_ptr(), rows.shape[0], width, out)
        return y


def _check_memory(*weights: torch.Tensor) -> None:
    if not all(w.dtype == torch.float32 and w.transpose(-2, -1).is_contiguous() for w in weights):
        raise ValueError("gemv needs fp32 weights over [in, out] memory")


@functools.cache
def load_gemv() -> Gemv | None:
    """The kernel built for this host (cached under ~/.cache/moe-cluster, else a directory of this
    user's in the temp dir), or None where it cannot be built."""
    source = resources.files("experts").joinpath("csrc", SOURCE).read_bytes()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: decode runs on torch's GEMMs")
        return None
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode() + _cpu_identity()).hexdigest()
    name = f"gemv-{key[:16]}.so"
    private_tmp = Path(tempfile.gettempdir()) / f"moe-cluster-{os.getuid()}"
    for cache in (Path.home() / ".cache" / "moe-cluster", private_tmp):
        try:
            return Gemv(ctypes.CDLL(str(_built(cache, name, source, compiler))))
        except (OSError, subprocess.SubprocessError) as error:
            stderr = getattr(error, "stderr", None)
            failure = f"{error}: {stderr.decode(errors='replace')[-500:]}" if stderr else str(error)
    log.warning("the decode GEMV kernel could not be built (%s): decode runs on torch's GEMMs", failure)
    return None


def _built(cache: Path, name: str, source: bytes, compiler: str) -> Path:
    """cache/name, compiled unless it is there; concurrent builders each write their own file and
    rename it into place, so a reader never sees half a library. Only a directory that this user owns
    and nobody else may write is used: a library planted there would run inside the engine."""
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = cache.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise OSError(f"{cache} is not private to this user")
    library = cache / name
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=cache) as work:
        src = Path(work) / SOURCE
        src.write_bytes(source)
        out = Path(work) / name
        subprocess.run(
            [compiler, *FLAGS, "-o", str(out), str(src), "-lm"], check=True, capture_output=True, timeout=120
        )
        os.replace(out, library)
    return library


def _cpu_identity() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(wanted)})).encode()
