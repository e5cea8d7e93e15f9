"""One MoE exchange round between 2 processes, gloo against shared memory, side by side in one run.

A round is what a decode step does per MoE layer and expert rank: the router sends a DISPATCH of
`rows` x `width` fp32 rows, the expert rank answers with a COMBINE of the same shape (no compute, so
the time is the transport's), and the router has read it. The two transports take turns, `repeats`
times each, so both see the same machine load; the spread over repeats is printed.

    python benchmarks/transport.py [--rows 16] [--width 512] [--rounds 2000] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch

from benchmarks.results import results_path
from cluster.transport.gloo import GlooTransport
from cluster.transport.shm import ShmTransport, new_prefix
from router.transport import OP, ROWS, Op, head

KINDS = ("gloo", "shm")
TARGET_SHM_P50_US = 100.0


def _open(kind: str, rendezvous: str, rank: int) -> GlooTransport | ShmTransport:
    if kind == "gloo":
        return GlooTransport(rendezvous, rank, 2, timeout_s=60)
    return ShmTransport(rendezvous, rank, 2, timeout_s=60)


def expert(rendezvous: dict[str, str], schedule: list[str], width: int) -> None:
    torch.set_num_threads(1)
    transports = {kind: _open(kind, rendezvous[kind], 1) for kind in KINDS}
    for kind in schedule:
        t = transports[kind]
        while True:
            got, rows = t.recv(0, width, torch.float32)
            if got[OP] == Op.STOP:
                break
            t.send(0, head(Op.COMBINE, 0, got[ROWS]), rows)
    for t in transports.values():
        t.close()


def rounds(t: GlooTransport | ShmTransport, payload: torch.Tensor, n: int) -> list[float]:
    """Seconds per round, as the router sees them."""
    seconds = []
    dispatch = head(Op.DISPATCH, 0, payload.shape[0])
    for _ in range(n):
        start = time.perf_counter()
        t.send(1, dispatch, payload)
        _, answer = t.recv(1, payload.shape[1], payload.dtype)
        seconds.append(time.perf_counter() - start)
    assert torch.equal(answer, payload)
    t.send(1, head(Op.STOP))
    return seconds


def percentiles(seconds: list[float]) -> dict[str, float]:
    us = torch.tensor(seconds, dtype=torch.float64) * 1e6
    q = torch.quantile(us, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "p50_us": q[0],
        "p90_us": q[1],
        "p99_us": q[2],
        "min_us": us.min().item(),
        "mean_us": us.mean().item(),
    }


def machine() -> dict:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {"cpu": model, "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2000, help="timed rounds per transport and repeat")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        rendezvous = {"gloo": f"127.0.0.1:{sock.getsockname()[1]}", "shm": new_prefix()}
    schedule = [kind for _ in range(args.repeats) for kind in KINDS]
    child = mp.get_context("spawn").Process(target=expert, args=(rendezvous, [*KINDS, *schedule], args.width))
    child.start()
    transports = {kind: _open(kind, rendezvous[kind], 0) for kind in KINDS}
    payload = torch.randn(args.rows, args.width)
    for kind in KINDS:
        rounds(transports[kind], payload, args.warmup)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for kind in schedule:
        runs[kind].append(percentiles(rounds(transports[kind], payload, args.rounds)))
    child.join(60)
    for t in transports.values():
        t.close()
    load_after = os.getloadavg()
    summary = {}
    print(f"round = dispatch + combine of {args.rows} x {args.width} fp32 rows between 2 processes")
    for kind in KINDS:
        p50s, p99s = [r["p50_us"] for r in runs[kind]], [r["p99_us"] for r in runs[kind]]
        summary[kind] = {"p50_us_median": sorted(p50s)[len(p50s) // 2], "p50_us": p50s, "p99_us": p99s}
        p50, p99 = summary[kind]["p50_us_median"], sorted(p99s)[len(p99s) // 2]
        print(
            f"{kind:>5}: p50 {p50:8.1f} us (repeats {min(p50s):.1f}..{max(p50s):.1f})"
            f"   p99 {p99:8.1f} us (repeats {min(p99s):.1f}..{max(p99s):.1f})"
        )
    ratio = summary["gloo"]["p50_us_median"] / summary["shm"]["p50_us_median"]
    shm_p50 = summary["shm"]["p50_us_median"]
    verdict = "met" if shm_p50 <= TARGET_SHM_P50_US else "MISSED"
    print(f"gloo / shm p50: {ratio:.1f}x; target shm p50 <= {TARGET_SHM_P50_US:.0f} us: {verdict}")
    print(f"load average (1, 5, 15 min): {load_before} at start, {load_after} at end")
    path = args.json or results_path("transport")
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": {"start": load_before, "end": load_after},
        "machine": machine(),
        "workload": vars(args) | {"json": str(path)},
        "runs": runs,
        "summary": summary,
        "gloo_over_shm_p50": ratio,
        "target_shm_p50_us": TARGET_SHM_P50_US,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
