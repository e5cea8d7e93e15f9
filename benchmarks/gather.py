"""Gathering rows on the CPU, side by side: indexing with a tensor (`x[index]`) against `index_select`,
one torch thread (index_select through router/layers.py's gather_slots), for the gathers a decode step
makes: the KV cache's keys of every sequence, the dispatch payload's rows, an expert shard's rows.

Prints microseconds per gather (p50 of many) and the ratio; writes JSON.

    python -m benchmarks.gather [--repeats 200] [--json PATH]

(default PATH: benchmarks/results/gather-<UTC time>.json)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.machine import machine_record
from benchmarks.results import results_path
from router.layers import gather_slots

CACHE_SLOTS = 20_000  # slots of one layer's K (or V) tensor
KV_HEADS, HEAD_DIM, HIDDEN = 4, 64, 512  # benchmarks/engine_vs_transformers.py's model
CASES = {  # name: (source shape, index shape)
    "kv keys, 1 sequence x 100": ((CACHE_SLOTS, KV_HEADS, HEAD_DIM), (1, 100)),
    "kv keys, 16 sequences x 100": ((CACHE_SLOTS, KV_HEADS, HEAD_DIM), (16, 100)),
    "kv keys, 64 sequences x 100": ((CACHE_SLOTS, KV_HEADS, HEAD_DIM), (64, 100)),
    "payload rows, 16 tokens": ((16, HIDDEN), (16,)),
    "expert rows, 64 tokens x 4": ((64, HIDDEN), (256,)),
}


def p50_us(gather, repeats: int) -> float:
    for _ in range(10):
        gather()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gather()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = machine_record()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (shape, index_shape) in CASES.items():
        source = torch.randn(*shape, generator=gen)
        index = torch.randint(0, shape[0], index_shape, generator=gen)
        indexed = p50_us(lambda source=source, index=index: source[index], args.repeats)
        selected = p50_us(lambda source=source, index=index: gather_slots(source, index), args.repeats)
        rows.append({"case": name, "indexing_us": indexed, "index_select_us": selected})
        ratio = indexed / selected
        print(f"{name:32s} x[index] {indexed:8.1f} us  index_select {selected:8.1f} us  {ratio:5.2f}x")
    path = args.json or results_path("gather")
    report = {"machine": record, "load_average_after": list(os.getloadavg()), "rows": rows}
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
