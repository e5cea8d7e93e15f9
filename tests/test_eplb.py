"""Online rebalancing on a skewed load: the ranks' compute load, max / mean over the expert ranks.

The load is the (token, expert) pairs each rank computed, counted by the router's exchange
(Engine.stats()["rank_pairs"]): what the exported imbalance gauge estimates from the routing.
"""

from __future__ import annotations

from cluster.engine import Engine

PROMPTS = [[7 * i + j for j in range(3 + i)] for i in range(1, 7)]


def _imbalance(pairs: list[int]) -> float:
    return max(pairs) / (sum(pairs) / len(pairs))


def test_rebalancing_evens_out_a_skewed_load(ray_cluster, skewed_checkpoint):
    with Engine(
        skewed_checkpoint,
        expert_shards=4,
        redundant_experts=4,
        eplb_interval_s=3.0,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
    ) as engine:
        engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        static = engine.stats(reset=True)["rank_pairs"]
        assert engine.info()["eplb"]["rebalances"] == 0  # that load ran on the static placement
        for _ in range(40):
            engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
            if engine.info()["eplb"]["rebalances"]:
                break
        engine.stats(reset=True)
        engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        balanced = engine.stats(reset=True)["rank_pairs"]
        info = engine.info()
    assert len(static) == len(balanced) == 4
    assert _imbalance(static) >= 2.0, static
    assert _imbalance(balanced) <= 1.25, balanced
    assert info["eplb"]["bytes_moved"] > 0
    hot_replicas = [sum(e in x["slots"] for x in info["experts"]) for e in (0, 1, 2)]
    assert sum(hot_replicas) > 3  # the hot experts got the extra slots
