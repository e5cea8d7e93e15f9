"""Time to first token with automatic prefix caching off (baseline) and on (candidate), side by side.

On the engine benchmark checkpoint (benchmarks/engine_vs_transformers.py's BENCH_CONFIG), one expert
shard on a real Ray cluster: 16 requests share a 2,000-token prefix and differ in a 50-token suffix, and
are sent one after another. Each request asks for one token, so its latency is its time to first token.
Each repeat uses a fresh prefix, so no repeat finds the previous one's blocks; the engines alternate.
Prints TTFT p50 of requests 2..16 per engine, the ratio and its spread over repeats, and the hit rate.

    python benchmarks/prefix_cache.py [--repeats 3] [--json PATH]

(default PATH: benchmarks/results/prefix_cache-<UTC time>.json)

Target: TTFT p50 of requests 2..16 >= 5x lower with caching on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.engine_vs_transformers import BENCH_CONFIG, FIRST_PLAIN_ID
from benchmarks.results import results_path
from cluster.demo import DEMO_TOKENIZER_VOCAB_SIZE, write_afmoe_checkpoint
from cluster.engine import Engine

PREFIX, SUFFIX, REQUESTS = 2000, 50, 16
TARGET = 5.0


def workload(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    token = lambda: rng.randrange(FIRST_PLAIN_ID, DEMO_TOKENIZER_VOCAB_SIZE)  # noqa: E731
    prefix = [token() for _ in range(PREFIX)]
    return [prefix + [token() for _ in range(SUFFIX)] for _ in range(REQUESTS)]


def ttfts(engine: Engine, prompts: list[list[int]]) -> tuple[list[float], list[int]]:
    """Seconds to the first token of each prompt, sent one after another; and the tokens."""
    seconds, firsts = [], []
    for prompt in prompts:
        started = time.perf_counter()
        [completion] = engine.generate([prompt], max_new_tokens=1, ignore_eos=True)
        seconds.append(time.perf_counter() - started)
        firsts.append(completion.token_ids[0])
    return seconds, firsts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    options = dict(expert_shards=1, router_cpus=1.0, expert_cpus=1.0, max_model_len=4096, max_num_seqs=4)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = write_afmoe_checkpoint(Path(tmp) / "model", BENCH_CONFIG, seed=0)
        engines = {
            "off": Engine(model, prefix_caching=False, **options),
            "on": Engine(model, prefix_caching=True, **options),
        }
        try:
            for repeat in range(args.repeats):
                prompts = workload(repeat)
                for name, engine in engines.items():
                    before = engine.stats()
                    seconds, firsts = ttfts(engine, prompts)
                    after = engine.stats()
                    queried = after["prefix_query_tokens"] - before["prefix_query_tokens"]
                    hits = after["prefix_hit_tokens"] - before["prefix_hit_tokens"]
                    runs[name].append(
                        {
                            "ttft_s": seconds,
                            "first_tokens": firsts,
                            "p50_requests_2_16_s": statistics.median(seconds[1:]),
                            "hit_rate": hits / queried if queried else 0.0,
                        }
                    )
        finally:
            for engine in engines.values():
                engine.shutdown()
    ray.shutdown()
    pairs = list(zip(runs["off"], runs["on"], strict=True))
    ratios = [off["p50_requests_2_16_s"] / on["p50_requests_2_16_s"] for off, on in pairs]
    same = all(off["first_tokens"] == on["first_tokens"] for off, on in pairs)
    for name, results in runs.items():
        p50s = ", ".join(f"{r['p50_requests_2_16_s'] * 1000:.1f}" for r in results)
        first = ", ".join(f"{r['ttft_s'][0] * 1000:.0f}" for r in results)
        rates = ", ".join(f"{r['hit_rate']:.3f}" for r in results)
        print(f"caching {name:>3}: TTFT p50 req 2..16 [ms] {p50s}; request 1 [ms] {first}; hit rate {rates}")
    print(
        f"ratio off/on: median {statistics.median(ratios):.1f}x "
        f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x; target >= {TARGET}x); "
        f"first tokens identical: {same}"
    )
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs")
    path = args.json or results_path("prefix_cache")
    report = {
        "benchmark": "prefix_cache",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "workload": {"prefix": PREFIX, "suffix": SUFFIX, "requests": REQUESTS, "repeats": args.repeats},
        "engine": {**options, "checkpoint": BENCH_CONFIG},
        "runs": runs,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "target": TARGET,
        "first_tokens_identical": same,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {path}")
    return 0 if min(ratios) >= TARGET and same else 1


if __name__ == "__main__":
    raise SystemExit(main())
