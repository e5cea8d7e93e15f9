import pytest
import torch

from experts.placement import ExpertPlacement, ModelPlacement, max_redundant


def test_contiguous_uneven_split_gives_first_shards_one_more() -> None:
    placement = ExpertPlacement(10, 3)
    assert [placement.num_local(s) for s in range(3)] == [4, 3, 3]
    assert placement.experts_of(0) == [0, 1, 2, 3]
    assert placement.experts_of(1) == [4, 5, 6]
    assert placement.experts_of(2) == [7, 8, 9]
    assert placement.shard_of.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert placement.local_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]


def test_round_robin() -> None:
    placement = ExpertPlacement(10, 3, "round_robin")
    assert placement.experts_of(0) == [0, 3, 6, 9]
    assert placement.experts_of(1) == [1, 4, 7]
    assert placement.experts_of(2) == [2, 5, 8]
    assert placement.shard_of.tolist() == [e % 3 for e in range(10)]
    assert placement.local_index.tolist() == [e // 3 for e in range(10)]


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
@pytest.mark.parametrize(("num_experts", "num_shards"), [(1, 1), (8, 8), (10, 3), (256, 7), (257, 8)])
def test_every_expert_placed_exactly_once(strategy: str, num_experts: int, num_shards: int) -> None:
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    owned = [e for s in range(num_shards) for e in placement.experts_of(s)]
    assert sorted(owned) == list(range(num_experts))
    assert placement.shard_of.dtype == placement.local_index.dtype == torch.int64
    for shard in range(num_shards):
        experts = placement.experts_of(shard)
        assert placement.num_local(shard) == len(experts) >= 1
        assert placement.shard_of[experts].eq(shard).all()
        assert placement.local_index[experts].tolist() == list(range(len(experts)))
    counts = [placement.num_local(s) for s in range(num_shards)]
    assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(
    ("num_experts", "num_shards", "strategy", "message"),
    [
        (10, 0, "contiguous", "num_shards must be >= 1"),
        (4, 5, "contiguous", "exceeds num_experts"),
        (10, 2, "random", "unknown placement strategy"),
    ],
)
def test_invalid_placement(num_experts: int, num_shards: int, strategy: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExpertPlacement(num_experts, num_shards, strategy)  # type: ignore[arg-type]


def test_shard_out_of_range() -> None:
    placement = ExpertPlacement(10, 3)
    with pytest.raises(ValueError, match="shard 3 out of range"):
        placement.experts_of(3)
    with pytest.raises(ValueError, match="shard -1 out of range"):
        placement.num_local(-1)


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
@pytest.mark.parametrize(
    ("num_experts", "num_shards", "redundant"), [(10, 3, 1), (10, 3, 5), (10, 3, 20), (7, 2, 7), (8, 4, 13)]
)
def test_redundant_slots_are_spread_and_never_twice_on_a_shard(strategy, num_experts, num_shards, redundant):
    placement = ExpertPlacement(num_experts, num_shards, strategy, redundant)
    base = ExpertPlacement(num_experts, num_shards, strategy)
    assert placement.num_slots == num_experts + redundant == placement.num_experts + placement.redundant
    for shard in range(num_shards):
        experts = placement.experts_of(shard)
        assert len(set(experts)) == len(experts), f"shard {shard} holds an expert twice"
        assert experts[: base.num_local(shard)] == base.experts_of(shard)  # the base slots come first
    counts = [placement.num_local(s) for s in range(num_shards)]
    assert max(counts) - min(counts) <= max(2, -(-num_experts // num_shards) - num_experts // num_shards + 1)
    replicas = [len(placement.replicas_of(e)) for e in range(num_experts)]
    assert sum(replicas) == placement.num_slots and max(replicas) - min(replicas) <= 1
    for expert in range(num_experts):  # every logical expert reachable through each of its replicas
        for shard, slot in placement.replicas_of(expert):
            assert placement.experts_of(shard)[slot] == expert
        assert int(placement.replica_count[expert]) == replicas[expert]
        reps = placement.replicas_of(expert)
        assert placement.replica_shard[expert, : len(reps)].tolist() == [s for s, _ in reps]
        assert placement.replica_slot[expert, : len(reps)].tolist() == [i for _, i in reps]
    assert (placement.shard_of.tolist(), placement.local_index.tolist()) == (
        base.shard_of.tolist(),
        base.local_index.tolist(),
    )


@pytest.mark.parametrize(("num_experts", "num_shards"), [(10, 3), (4, 1), (7, 2)])
def test_redundant_experts_out_of_range_are_refused(num_experts: int, num_shards: int) -> None:
    limit = max_redundant(num_experts, num_shards)
    assert limit == num_experts * (num_shards - 1)
    ExpertPlacement(num_experts, num_shards, redundant=limit)
    for bad in (-1, limit + 1):
        with pytest.raises(ValueError, match=f"redundant_experts must be between 0 and {limit}"):
            ExpertPlacement(num_experts, num_shards, redundant=bad)


def test_without_ranks_keeps_the_live_slots_or_says_none() -> None:
    placement = ExpertPlacement(6, 3, redundant=6)  # every expert on two shards
    for dead in range(3):
        survivor = placement.without_ranks({dead})
        assert survivor is not None and survivor.num_shards == 3 and survivor.num_local(dead) == 0
        for shard in set(range(3)) - {dead}:
            assert survivor.experts_of(shard) == placement.experts_of(shard)  # no slot moves
        for expert in range(6):
            assert sorted(survivor.replicas_of(expert)) == sorted(
                r for r in placement.replicas_of(expert) if r[0] != dead
            )
    assert placement.without_ranks({0, 1}) is None  # expert(s) held only by shards 0 and 1
    assert ExpertPlacement(6, 3).without_ranks({2}) is None
    assert placement.without_ranks(set()) == placement
    with pytest.raises(ValueError, match="out of range"):
        placement.without_ranks({3})


def test_from_slots_refuses_two_replicas_on_one_shard_and_unplaced_experts() -> None:
    with pytest.raises(ValueError, match="two replicas"):
        ExpertPlacement.from_slots(3, [[0, 1, 0], [2]])
    with pytest.raises(ValueError, match=r"experts \[2\] have no slot"):
        ExpertPlacement.from_slots(3, [[0], [1]])


def test_a_model_placement_is_one_placement_per_layer_with_equal_slot_counts() -> None:
    start = ModelPlacement.uniform(3, 6, 3, redundant=3)
    assert start.num_layers == 3 and start.redundant == 3
    assert start.slots_of(1) == [start.layer(0).experts_of(1)] * 3
    moved = ExpertPlacement.from_slots(6, [[5, 0, 1], [2, 3, 0], [4, 5, 1]])
    assert [moved.num_local(s) for s in range(3)] == [start.num_local(s) for s in range(3)]
    layered = ModelPlacement([start.layer(0), moved, start.layer(2)])
    assert layered.slots_of(0) == [start.layer(0).experts_of(0), [5, 0, 1], start.layer(2).experts_of(0)]
    assert layered != start and layered == ModelPlacement([start.layer(0), moved, start.layer(2)])
    with pytest.raises(ValueError, match="slots per shard"):
        ModelPlacement([start.layer(0), ExpertPlacement.from_slots(6, [[0, 1, 2, 3], [4, 5], [0]])])
    with pytest.raises(ValueError, match="experts on"):
        ModelPlacement([start.layer(0), ExpertPlacement(7, 3, redundant=2)])
    with pytest.raises(ValueError, match="at least one"):
        ModelPlacement([])


def test_a_model_placement_without_ranks_needs_every_layer_covered() -> None:
    twice = ExpertPlacement.from_slots(3, [[0, 1], [1, 2], [2, 0]])  # every expert on two shards
    once = ExpertPlacement.from_slots(3, [[0, 1], [0, 1], [2, 0]])  # expert 2 on shard 2 only
    layered = ModelPlacement([twice, once])
    assert layered.without_ranks({2}) is None  # layer 1 loses its only copy of expert 2
    survivor = layered.without_ranks({0})
    assert survivor is not None
    assert survivor.layers == (twice.without_ranks({0}), once.without_ranks({0}))
    assert survivor.num_local(0) == 0
