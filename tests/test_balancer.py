"""The balancer (experts/balancer.py) on observed loads: valid placements, never worse than static."""

import pytest
import torch

from experts.balancer import imbalance, rebalance, rebalance_model, replica_counts, step_imbalance
from experts.placement import ExpertPlacement, ModelPlacement


def _zipf(num_experts: int, seed: int, skew: float = 1.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randperm(num_experts, generator=gen).double() + 1
    return (1000 / ranks**skew).round().long()


@pytest.mark.parametrize(
    ("num_experts", "num_shards", "redundant"), [(8, 2, 2), (10, 3, 5), (16, 4, 4), (16, 4, 16), (7, 2, 7)]
)
@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
def test_rebalanced_placement_is_valid_and_never_worse_than_static(
    num_experts, num_shards, redundant, strategy
):
    static = ExpertPlacement(num_experts, num_shards, strategy, redundant)
    for seed in range(20):
        load = _zipf(num_experts, seed, skew=0.3 + seed / 10)
        placement = rebalance(load, static)
        assert [placement.num_local(s) for s in range(num_shards)] == [
            static.num_local(s) for s in range(num_shards)
        ]
        for shard in range(num_shards):  # from_slots refuses two replicas on a shard
            assert len(set(placement.experts_of(shard))) == placement.num_local(shard)
        assert all(placement.replicas_of(e) for e in range(num_experts))  # every expert reachable
        assert placement.rank_load(load).max() <= static.rank_load(load).max()
        assert rebalance(load, placement) == rebalance(load, placement)  # deterministic


def test_hot_experts_get_the_replicas_and_the_imbalance_falls():
    static = ExpertPlacement(16, 4, redundant=4)
    load = torch.full((16,), 10)
    load[[0, 1]] = 400  # both on rank 0 in the static placement
    assert imbalance(static, load) >= 2.0
    placement = rebalance(load, static)
    assert len(placement.replicas_of(0)) >= 2 and len(placement.replicas_of(1)) >= 2
    assert imbalance(placement, load) <= 1.25


def test_an_even_load_keeps_the_placement_and_no_load_changes_nothing():
    static = ExpertPlacement(8, 2)
    assert rebalance(torch.ones(8, dtype=torch.long), static) is static
    assert rebalance(torch.zeros(8, dtype=torch.long), ExpertPlacement(8, 2, redundant=3)) == (
        ExpertPlacement(8, 2, redundant=3)
    )
    with pytest.raises(ValueError, match="expected"):
        rebalance(torch.ones(5), static)


def test_replica_counts_follow_the_load_per_replica():
    assert replica_counts(torch.tensor([90, 30, 10]), 6, 3) == [3, 2, 1]
    assert replica_counts(torch.tensor([90, 30, 10]), 5, 2) == [2, 2, 1]  # capped at one per shard


def test_rebalance_on_a_placement_without_a_dead_rank_uses_only_live_ranks():
    live = ExpertPlacement(6, 3, redundant=6).without_ranks({1})
    load = torch.tensor([50, 1, 1, 1, 1, 1])
    placement = rebalance(load, live)
    assert placement.num_local(1) == 0
    assert placement.rank_load(load).max() <= live.rank_load(load).max()


def test_each_layer_is_balanced_on_its_own_load():
    """Other hot experts on each layer: one placement for both could not even out both layers (what
    a placement balanced on the summed load does), one per layer evens out each."""
    start = ModelPlacement.uniform(2, 8, 4, redundant=4)
    load = torch.full((2, 8), 10)
    load[0, 0] = 800  # layer 0: on shard 0 in the static placement, and cold on layer 1
    load[1, 7] = 800  # layer 1: on shard 3
    balanced = rebalance_model(load, start)
    for layer in range(2):
        assert imbalance(start.layer(layer), load[layer]) > 1.8
        assert imbalance(balanced.layer(layer), load[layer]) < 1.25
        assert balanced.layer(layer) == rebalance(load[layer], start.layer(layer))
    shared = rebalance(load.sum(0), start.layer(0))
    assert step_imbalance(balanced, load) < step_imbalance(ModelPlacement([shared, shared]), load)
    assert step_imbalance(start, load) == pytest.approx(
        sum(float(start.layer(i).rank_load(load[i]).max()) for i in range(2))
        / sum(float(start.layer(i).rank_load(load[i]).mean()) for i in range(2))
    )
    assert rebalance_model(torch.zeros(2, 8, dtype=torch.long), start) is start
    with pytest.raises(ValueError, match="expected \\(2, 8\\)"):
        rebalance_model(torch.zeros(8), start)
