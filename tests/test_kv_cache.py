import pytest
import torch

from router.config import ModelConfig
from router.kv_cache import FULL, SLIDING, BlockAllocator, KVCache, SequenceBlocks
from tests.toolkit import tiny_config

KV_HEADS, HEAD_DIM = 2, 8


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _config(layer_types: list[str], window: int = 5) -> ModelConfig:
    return ModelConfig.from_dict(
        tiny_config(
            num_hidden_layers=len(layer_types),
            num_key_value_heads=KV_HEADS,
            head_dim=HEAD_DIM,
            sliding_window=window,
            layer_types=layer_types,
        )
    )


MIXED = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
# bytes of one block of one layer: K and V, block_size 4, fp32
BLOCK_BYTES = 2 * 4 * KV_HEADS * HEAD_DIM * 4


def _cache(
    layer_types: list[str] = MIXED,
    window: int = 5,
    full_blocks: int = 32,
    max_num_seqs: int = 4,
    block_size=4,
) -> KVCache:
    config = _config(layer_types, window)
    sliding = sum(t == "sliding_attention" for t in layer_types)
    full = len(layer_types) - sliding
    ring_len = -(-max(window - 1, 1) // block_size) if sliding else 0
    block_bytes = 2 * block_size * KV_HEADS * HEAD_DIM * 4
    budget = max_num_seqs * ring_len * block_bytes * sliding + full_blocks * block_bytes * full
    return KVCache(config, budget, max_num_seqs, block_size, torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- allocator


def test_block_allocator_allocates_distinct_blocks_until_exhausted() -> None:
    alloc = BlockAllocator(5)
    a = alloc.allocate(3)
    assert len(a) == len(set(a)) == 3 and alloc.num_free == 2
    assert alloc.allocate(0) == [] and alloc.num_free == 2
    b = alloc.allocate(2)
    assert set(a) | set(b) == set(range(5)) and alloc.num_free == 0
    with pytest.raises(MemoryError, match="1 blocks wanted, 0 free"):
        alloc.allocate(1)
    alloc.release(a)
    assert alloc.num_free == 3
    c = alloc.allocate(3)
    assert set(c) == set(a)


def test_block_allocator_refuses_more_than_free_and_keeps_state() -> None:
    alloc = BlockAllocator(4)
    alloc.allocate(2)
    with pytest.raises(MemoryError):
        alloc.allocate(3)
    assert alloc.num_free == 2


# ---------------------------------------------------------------------------------------------- sizing


def test_budget_gives_rings_first_and_the_rest_to_full_blocks() -> None:
    config = _config(MIXED, window=5)  # 3 sliding layers, 1 full; ring = ceil(4 / 4) = 1 block
    ring_bytes = 4 * 1 * BLOCK_BYTES * 3  # 4 sequences
    budget = ring_bytes + 10 * BLOCK_BYTES + BLOCK_BYTES - 1  # 10 full blocks and change
    cache = KVCache(config, budget, 4, 4, torch.float32, torch.device("cpu"))
    assert cache.ring_len == 1
    assert cache.ring_blocks.num_blocks == 4
    assert cache.full_blocks.num_blocks == 10
    assert cache.nbytes <= budget
    assert cache.nbytes == ring_bytes + 10 * BLOCK_BYTES
    assert [tuple(k.shape) for k in cache.k] == [(16, KV_HEADS, HEAD_DIM)] * 3 + [(40, KV_HEADS, HEAD_DIM)]
    assert cache.group_of == [SLIDING, SLIDING, SLIDING, FULL]


def test_budget_too_small_for_one_full_block_is_refused() -> None:
    config = _config(MIXED, window=5)
    ring_bytes = 4 * BLOCK_BYTES * 3
    with pytest.raises(ValueError, match="too small"):
        KVCache(config, ring_bytes + BLOCK_BYTES - 1, 4, 4, torch.float32, torch.device("cpu"))


def test_all_full_and_all_sliding_models() -> None:
    full = _cache(["full_attention"] * 2, full_blocks=6)
    assert full.ring_len == 0 and full.ring_blocks.num_blocks == 0
    assert full.full_blocks.num_blocks == 6
    assert full.blocks_for(9) == 3
    sliding = _cache(["sliding_attention"] * 2, window=9, max_num_seqs=3)
    assert sliding.full_blocks.num_blocks == 0
    assert sliding.ring_len == 2 and sliding.ring_blocks.num_blocks == 6
    assert sliding.blocks_for(10_000) == 0  # length costs a sliding-only model nothing
    assert sliding.can_allocate(10_000)


@pytest.mark.parametrize(
    ("window", "block_size", "ring_len"), [(5, 4, 1), (6, 4, 2), (1, 4, 1), (2, 1, 1), (9, 4, 2), (17, 4, 4)]
)
def test_ring_holds_window_minus_one_positions(window: int, block_size: int, ring_len: int) -> None:
    cache = _cache(window=window, block_size=block_size)
    assert cache.ring_len == ring_len
    assert cache.ring_len * block_size >= window - 1
    assert (cache.ring_len - 1) * block_size < max(window - 1, 1)


# ---------------------------------------------------------------------------------------------- allocation


def test_can_allocate_needs_full_blocks_and_a_ring() -> None:
    cache = _cache(full_blocks=8, max_num_seqs=2)
    assert cache.can_allocate(32) and not cache.can_allocate(33)
    a = cache.allocate(9)  # 3 full blocks + 1 ring block
    assert len(a.full) == 3 and len(a.ring) == 1
    b = cache.allocate(4)
    assert not cache.can_allocate(1)  # full blocks left, but both rings are taken
    cache.release(a)
    assert a.full == [] and a.ring == []
    assert cache.can_allocate(28) and not cache.can_allocate(29)  # b holds 1 of the 8 full blocks
    cache.release(b)
    assert cache.full_blocks.num_free == 8 and cache.ring_blocks.num_free == 2


def test_usage() -> None:
    cache = _cache(full_blocks=10, max_num_seqs=2)  # 10 full + 2 ring blocks
    assert cache.usage() == 0.0
    blocks = cache.allocate(9)  # 3 + 1
    assert cache.usage() == pytest.approx(4 / 12)
    other = cache.allocate(28)  # 7 + 1
    assert cache.usage() == pytest.approx(1.0)
    cache.release(blocks)
    cache.release(other)
    assert cache.usage() == 0.0


# ---------------------------------------------------------------------------------------------- build


class FakeKeys:
    """Per layer group, a key store holding the position number of each written key (-1: never written).

    Reads and writes follow the model's order: every part reads its cached slots, then the step's keys
    are written.
    """

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.store = {
            g: torch.full((cache.k[cache.group_of.index(g)].shape[0],), -1) for g in set(cache.group_of)
        }

    def step(self, starts: list[int], lengths: list[int], blocks: list[SequenceBlocks]):
        """Runs one step; returns {group: {(seq, qpos): [visible key positions]}}."""
        batch = self.cache.build(starts, lengths, blocks)
        assert batch.positions.tolist() == [
            p for s, n in zip(starts, lengths, strict=True) for p in range(s, s + n)
        ]
        owner = [i for i, n in enumerate(lengths) for _ in range(n)]
        covered = sorted(int(t) for part in batch.parts for t in part.tokens)
        assert covered == list(range(sum(lengths)))  # every step token in exactly one part
        seen = {}
        for group, store in self.store.items():
            visible = {}
            for part in batch.parts:
                index = part.groups[group]
                lc = index.cached_slots.shape[1]
                assert index.mask.shape == (part.batch, 1, part.max_query, lc + part.max_query)
                # padded query rows included: a row that sees no key would make attention NaN
                assert index.mask.any(-1).all()
                cached_pos = store[index.cached_slots]
                grid_tokens = torch.full((part.batch * part.max_query,), -1)
                grid_tokens[part.grid_index] = part.tokens
                grid_tokens = grid_tokens.view(part.batch, part.max_query)
                for b in range(part.batch):
                    for j in range(part.max_query):
                        token = int(grid_tokens[b, j])
                        if token < 0:
                            continue
                        seq, qpos = owner[token], int(batch.positions[token])
                        row = index.mask[b, 0, j]
                        keys = cached_pos[b][row[:lc]].tolist()
                        step_tokens = grid_tokens[b][row[lc:]]
                        assert (step_tokens >= 0).all(), "a query attends to a padded key"
                        keys += batch.positions[step_tokens].tolist()
                        visible[(seq, qpos)] = keys
            seen[group] = visible
            writes = torch.cat([p.groups[group].write_slots for p in batch.parts])
            assert writes.unique().numel() == writes.numel(), "two keys written to one slot"
            for part in batch.parts:
                index = part.groups[group]
                for t, slot in zip(index.write_tokens.tolist(), index.write_slots.tolist(), strict=True):
                    mine = blocks[owner[t]].full if group == FULL else blocks[owner[t]].ring
                    assert slot // self.cache.block_size in mine, (
                        "a key written outside its sequence's blocks"
                    )
                store[index.write_slots] = batch.positions[index.write_tokens]
        return seen


def _expected(group: str, qpos: int, window: int) -> list[int]:
    low = 0 if group == FULL else max(0, qpos - window + 1)
    return list(range(low, qpos + 1))


def test_build_mixed_batch_parts_positions_and_masks() -> None:
    cache = _cache(window=5)
    fake = FakeKeys(cache)
    prompt_a = 6
    blocks = [cache.allocate(20), cache.allocate(20), cache.allocate(20)]
    # step 1: A prefills its whole prompt, B its first 4 tokens
    fake.step([0, 0], [prompt_a, 4], blocks[:2])
    # step 2: A decodes, B prefills 5 more, C prefills 3: one decode part and one padded prefill part
    starts, lengths = [4, prompt_a, 0], [5, 1, 3]
    order = [blocks[1], blocks[0], blocks[2]]
    batch = cache.build(starts, lengths, order)
    assert batch.positions.tolist() == [4, 5, 6, 7, 8, 6, 0, 1, 2]
    decode, prefill = batch.parts
    assert decode.batch == 1 and decode.max_query == 1 and decode.tokens.tolist() == [5]
    assert prefill.batch == 2 and prefill.max_query == 5
    assert prefill.tokens.tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    assert prefill.grid_index.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # each query sees exactly its window: cached keys of earlier steps and keys of this step
    seen = fake.step(starts, lengths, order)
    for group in (FULL, SLIDING):
        for seq, qpos in [(0, 4), (0, 8), (1, 6), (2, 0), (2, 2)]:
            assert sorted(seen[group][(seq, qpos)]) == _expected(group, qpos, 5), (group, seq, qpos)
    assert len(seen[FULL]) == len(seen[SLIDING]) == 9


@pytest.mark.parametrize(
    ("window", "block_size", "chunks"),
    [
        (5, 4, [3, 1, 1]),  # the ring is exactly window - 1 slots
        (5, 4, [13, 1]),  # a chunk longer than the ring
        (6, 4, [2, 7]),  # the ring is longer than window - 1
        (7, 2, [1, 1, 5, 2]),
        (3, 4, [9]),
        (1, 2, [4]),  # window 1: a key sees only itself
    ],
)
def test_ring_keeps_the_last_window_positions_readable_over_many_steps(
    window: int, block_size: int, chunks: list[int]
) -> None:
    """Three sequences that prefill in chunks, then decode for 30 steps, side by side with offsets."""
    total = 40
    cache = _cache(window=window, block_size=block_size, full_blocks=3 * -(-total // block_size))
    fake = FakeKeys(cache)
    blocks = [cache.allocate(total) for _ in range(3)]
    plans = []
    for seq in range(3):
        lengths = chunks[seq:] + chunks[:seq]  # a different chunking per sequence
        plans.append([0] * seq + lengths + [1] * (total - sum(lengths) - seq))  # 0: idle this step
    done = [0, 0, 0]
    for step in range(max(len(p) for p in plans)):
        members = [s for s in range(3) if step < len(plans[s]) and plans[s][step] > 0]
        if not members:
            continue
        starts = [done[s] for s in members]
        lengths = [plans[s][step] for s in members]
        seen = fake.step(starts, lengths, [blocks[s] for s in members])
        for local, s in enumerate(members):
            for qpos in range(starts[local], starts[local] + lengths[local]):
                for group in (FULL, SLIDING):
                    assert sorted(seen[group][(local, qpos)]) == _expected(group, qpos, window), (
                        f"step {step}, seq {s}, position {qpos}, {group}"
                    )
            done[s] += lengths[local]
    assert done == [sum(p) for p in plans]


def test_build_masks_for_sliding_window_are_exact_on_a_long_prefill() -> None:
    window = 4
    cache = _cache(window=window)
    blocks = cache.allocate(12)
    batch = cache.build([0], [12], [blocks])
    (part,) = batch.parts
    for group in (FULL, SLIDING):
        index = part.groups[group]
        assert index.cached_slots.shape[1] == 0
        mask = index.mask[0, 0]
        for q in range(12):
            for kp in range(12):
                visible = kp <= q and (group == FULL or q - window < kp)
                assert bool(mask[q, kp]) == visible, (group, q, kp)
    # a long chunk keeps only the keys that later steps can still see in the ring
    sliding = part.groups[SLIDING]
    kept = sorted(batch.positions[sliding.write_tokens].tolist())
    assert kept == list(range(12 - cache.ring_len * cache.block_size, 12))
    assert sorted(batch.positions[part.groups[FULL].write_tokens].tolist()) == list(range(12))
