"""Online rebalancing on a skewed load: the ranks' compute load, max / mean over the expert ranks.

Read twice: as the (token, expert) pairs each rank computed, counted by the router's exchange
(Engine.stats()["rank_pairs"]), and as operators see it, the exported per-layer gauge
`moe_expert_imbalance`, which estimates the same from the routing.
"""

from __future__ import annotations

from pathlib import Path

from cluster.engine import Engine
from tests.conftest import HOT_EXPERTS
from tests.toolkit import scrape, wait_for

PROMPTS = [[7 * i + j for j in range(3 + i)] for i in range(1, 7)]


def _imbalance(pairs: list[int]) -> float:
    return max(pairs) / (sum(pairs) / len(pairs))


def test_rebalancing_evens_out_a_skewed_load(ray_cluster, metrics_export_port, skewed_checkpoint):
    def gauge() -> list[float]:
        model = Path(skewed_checkpoint).name
        return [v for _, v in scrape(metrics_export_port, "moe_expert_imbalance", model=model)]

    with Engine(
        skewed_checkpoint,
        expert_shards=4,
        redundant_experts=4,
        eplb_interval_s=3.0,
        eplb_window_s=3.0,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
    ) as engine:
        engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        static = engine.stats(reset=True)["rank_pairs"]
        assert engine.info()["eplb"]["rebalances"] == 0  # that load ran on the static placement
        assert wait_for(lambda: len(gauge()) == 2, 60), gauge()  # one per MoE layer
        static_gauge = gauge()
        for _ in range(40):
            engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
            if engine.info()["eplb"]["rebalances"]:
                break
        engine.stats(reset=True)
        engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        balanced = engine.stats(reset=True)["rank_pairs"]
        info = engine.info()
        # the export catches up with the rebalanced windows (a window spanning the switch mixes both)
        balanced_gauge_ok = wait_for(lambda: max(gauge()) <= 1.25, 60)
        balanced_gauge = gauge()
        print("imbalance gauge: static", static_gauge, "rebalanced", balanced_gauge)
        print("rank pairs: static", static, "rebalanced", balanced)
    assert len(static) == len(balanced) == 4
    assert _imbalance(static) >= 2.0, static
    assert _imbalance(balanced) <= 1.25, balanced
    assert min(static_gauge) >= 1.75, static_gauge  # one flush's few steps: noisier than the run's pairs
    assert balanced_gauge_ok, balanced_gauge  # every MoE layer, each balanced on its own load
    assert info["eplb"]["bytes_moved"] > 0
    for layer in range(2):  # the hot experts got the extra slots, on each layer
        assert sum(e in x["slots"][layer] for x in info["experts"] for e in HOT_EXPERTS) > len(HOT_EXPERTS)
