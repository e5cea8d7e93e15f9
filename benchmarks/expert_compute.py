"""One expert rank's compute, side by side: fp32 against bf16 weights, one GEMM chain per active expert
against torch._grouped_mm, the C decode kernel (gemv: fp32 over [in, out] memory only,
experts/gemv_kernel.py) and the per-call choice between them (auto), each with the weights'
memory [E, out, in] (the checkpoint's) and [E, in, out], for decode-sized and prefill-sized batches
(ExpertShard.forward as the expert loop calls it, one torch thread as an expert actor runs). The
`default` column marks the memory order ExpertShard picks (experts/gemm_layout.py).

Prints microseconds per call and the weight bytes per second it reads, against the memory read
bandwidth measured in the same run; writes JSON.

    python -m benchmarks.expert_compute [--json PATH]

(default PATH: benchmarks/results/expert_compute-<UTC time>.json)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import machine_record, read_bandwidth
from benchmarks.results import results_path
from experts.gemm_layout import held_as, reads_transposed
from experts.gemv_kernel import load_gemv
from experts.shard import ExpertShard

HIDDEN, INTER, EXPERTS, TOP_K = 512, 256, 64, 4  # benchmarks/engine_vs_transformers.py's experts
TOKENS = (1, 2, 4, 8, 16, 64, 256)
KERNELS = {"loop": "loop", "grouped_mm": "grouped_mm", "gemv": "gemv", "auto": None}
MEMORY = {"out_in": False, "in_out": True}


def shard(dtype: torch.dtype, kernel: str | None, transposed: bool, gen: torch.Generator) -> ExpertShard:
    """A shard whose weights are held in the memory order `transposed` says, whichever it would pick;
    over [out, in] memory it has no gemv kernel, which reads [in, out] only."""
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.05
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.05
    experts = ExpertShard([gate_up.to(dtype)], [down.to(dtype)], kernel)
    experts.gate_up = [held_as(t, transposed) for t in experts.gate_up]
    experts.down = [held_as(t, transposed) for t in experts.down]
    if not transposed:
        experts.gemv = None
    return experts


def time_forward(experts: ExpertShard, tokens: int, gen: torch.Generator, repeats: int) -> tuple[list, int]:
    """Seconds per forward over `repeats` random routings; distinct experts touched (mean)."""
    rows = torch.randn(tokens, HIDDEN, generator=gen).to(experts.gate_up[0].dtype)
    times, touched = [], []
    for _ in range(repeats):
        ids = torch.rand(tokens, EXPERTS, generator=gen).topk(TOP_K, dim=1).indices
        weights = torch.rand(tokens, TOP_K, generator=gen)
        started = time.perf_counter()
        experts.forward(0, rows, ids, weights)
        times.append(time.perf_counter() - started)
        touched.append(ids.unique().numel())
    return times, round(statistics.mean(touched))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = machine_record()
    bandwidth = read_bandwidth()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype, kernel, memory in itertools.product((torch.float32, torch.bfloat16), KERNELS, MEMORY):
        transposed = MEMORY[memory]
        if kernel == "gemv" and not (transposed and dtype == torch.float32 and load_gemv()):
            continue
        experts = shard(dtype, KERNELS[kernel], transposed, gen)
        default = transposed == reads_transposed(torch.device("cpu"), dtype)
        time_forward(experts, 16, gen, 3)  # warm-up
        for tokens in TOKENS:
            times, touched = time_forward(experts, tokens, gen, args.repeats)
            p50 = statistics.median(times)
            weight_bytes = touched * 3 * HIDDEN * INTER * dtype.itemsize
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "kernel": kernel,
                    "memory": memory,
                    "default": default,
                    "tokens": tokens,
                    "experts_touched": touched,
                    "p50_us": p50 * 1e6,
                    "spread_us": [min(times) * 1e6, max(times) * 1e6],
                    "weight_gb_per_s": weight_bytes / p50 / 1e9,
                    "share_of_bandwidth": weight_bytes / p50 / bandwidth,
                }
            )
            r = rows[-1]
            print(
                f"{r['dtype']:>8} {kernel:>10} {memory}{'*' if default else ' '} "
                f"{tokens:>4} tokens ({touched:>2} experts): "
                f"{r['p50_us']:8.0f} us p50, {r['weight_gb_per_s']:5.1f} GB/s of weights "
                f"({r['share_of_bandwidth']:.0%} of {bandwidth / 1e9:.1f} GB/s read bandwidth)",
                flush=True,
            )
    path = args.json or results_path("expert_compute")
    report = {"machine": record, "read_bandwidth_bytes_per_s": bandwidth, "rows": rows}
    report["load_average_after"] = list(os.getloadavg())
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
