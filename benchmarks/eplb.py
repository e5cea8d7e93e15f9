"""Online expert rebalancing on a skewed load: throughput and rank imbalance, static vs rebalanced.

A checkpoint whose expert_bias draws every token to 2 of 3 hot experts (cluster.demo.write_checkpoint
hot_experts), the static contiguous placement putting them on the first two of the expert shards.
Both phases run the same greedy requests on one local Ray cluster, one engine after the other, each
with the same redundant slots:

  static:     eplb off: the start placement (extra slots round robin over the experts)
  rebalanced: eplb on; warm-up requests until the first rebalance has taken effect, then measured

Imbalance: max / mean of the (token, expert) pairs each expert rank computed (Engine.stats rank_pairs).

    python -m benchmarks.eplb [--expert-shards 4] [--redundant 4] [--requests 32] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.results import BenchmarkRun
from cluster.demo import write_checkpoint
from cluster.engine import Engine

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_dense_layers=0,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
)
HOT = (0, 1, 2)


def imbalance(pairs: list[int]) -> float:
    return max(pairs) / (sum(pairs) / len(pairs))


def measure(engine: Engine, prompts: list[list[int]], max_tokens: int) -> dict:
    engine.stats(reset=True)
    started = time.perf_counter()
    done = engine.generate(prompts, max_new_tokens=max_tokens, ignore_eos=True)
    seconds = time.perf_counter() - started
    pairs = engine.stats(reset=True)["rank_pairs"]
    tokens = sum(len(c.token_ids) for c in done)
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "rank_pairs": pairs,
        "imbalance": imbalance(pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-shards", type=int, default=4)
    parser.add_argument("--redundant", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    run = BenchmarkRun("eplb", args)
    prompts = [[(11 * i + j) % 1500 + 5 for j in range(4 + i % 9)] for i in range(args.requests)]
    common = dict(
        expert_shards=args.expert_shards,
        redundant_experts=args.redundant,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
    )
    results = {}
    ray.init(num_cpus=2 * (1 + args.expert_shards), log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = write_checkpoint(Path(tmp) / "skewed", CONFIG, seed=3, hot_experts=HOT)
            with Engine(model, eplb=False, **common) as engine:
                measure(engine, prompts[:4], 4)  # warm-up
                results["static"] = measure(engine, prompts, args.max_tokens)
            with Engine(model, eplb_interval_s=1.0, **common) as engine:
                warmups = 0
                while not engine.info()["eplb"]["rebalances"] and warmups < 60:
                    measure(engine, prompts[:8], 8)
                    warmups += 1
                results["rebalanced"] = measure(engine, prompts, args.max_tokens)
                results["rebalanced"]["eplb"] = engine.info()["eplb"]
                results["rebalanced"]["warmup_batches"] = warmups
    finally:
        ray.shutdown()
    static, balanced = results["static"], results["rebalanced"]
    results["throughput_ratio"] = balanced["tokens_per_s"] / static["tokens_per_s"]
    print(f"{'':12} {'static':>12} {'rebalanced':>12}")
    print(f"{'tokens/s':12} {static['tokens_per_s']:12.1f} {balanced['tokens_per_s']:12.1f}")
    print(f"{'imbalance':12} {static['imbalance']:12.2f} {balanced['imbalance']:12.2f}")
    print(f"{'rank pairs':12} {static['rank_pairs']!s:>12} {balanced['rank_pairs']!s:>12}")
    print(f"throughput rebalanced / static: {results['throughput_ratio']:.2f}")
    run.write(results)


if __name__ == "__main__":
    main()
