import pytest
import torch

from experts.placement import ExpertPlacement


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
