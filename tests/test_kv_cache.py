import pytest
import torch

from router.block_pool import BlockPool
from router.config import ModelConfig
from router.engine_core import default_cache_bytes
from router.kv_cache import DROPPED, FULL, SLIDING, KVCache, SequenceBlocks, sliding_pool_blocks

KV_HEADS, HEAD_DIM = 2, 8


@pytest.fixture(autouse=True, scope="module")
def _one_compute_thread():
    """Tiny tensors: intra-op threads only add wake-up latency, a lot of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(layer_types: list[str], window: int = 5) -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "architectures": ["AfmoeForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_hidden_layers": len(layer_types),
            "num_dense_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": window,
            "layer_types": layer_types,
        }
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
    block_bytes = 2 * block_size * KV_HEADS * HEAD_DIM * 4
    sliding_blocks = sliding_pool_blocks(config, max_num_seqs, block_size, 64)
    budget = (sliding_blocks * sliding + full_blocks * full) * block_bytes
    cache = KVCache(config, budget, max_num_seqs, block_size, torch.float32, torch.device("cpu"), 64)
    assert cache.full.num_blocks == (full_blocks if full else 0)
    return cache


# ---------------------------------------------------------------------------------------------- pool


def test_block_pool_allocates_distinct_blocks_until_exhausted() -> None:
    pool = BlockPool(5)
    a = pool.allocate(3)
    assert len(a) == len(set(a)) == 3 and pool.num_free == 2 and pool.num_used == 3
    assert pool.allocate(0) == [] and pool.num_free == 2
    b = pool.allocate(2)
    assert set(a) | set(b) == set(range(5)) and pool.num_free == 0
    with pytest.raises(MemoryError, match="1 blocks wanted, 0 free"):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free == 3
    assert set(pool.allocate(3)) == set(a)


def test_block_pool_refuses_more_than_free_and_keeps_state() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(3)
    assert pool.num_free == 2


def test_block_pool_counts_references_and_refuses_a_double_release() -> None:
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.touch([block])
    pool.release([block])
    assert not pool.is_free(block)  # one reference left
    pool.release([block])
    assert pool.is_free(block)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([block])


# ---------------------------------------------------------------------------------------------- sizing


def test_budget_gives_the_sliding_pool_its_share_and_the_rest_to_full_blocks() -> None:
    config = _config(MIXED, window=5)  # 3 sliding layers, 1 full; a window is ceil(4 / 4) = 1 block
    sliding_blocks = 4 * (1 + 2) + 2  # 4 sequences (window + 2 edge blocks each), an 8-token chunk
    sliding_bytes = sliding_blocks * BLOCK_BYTES * 3
    budget = sliding_bytes + 10 * BLOCK_BYTES + BLOCK_BYTES - 1  # 10 full blocks and change
    cache = KVCache(config, budget, 4, 4, torch.float32, torch.device("cpu"), max_num_batched_tokens=8)
    assert sliding_pool_blocks(config, 4, 4, 8) == sliding_blocks == cache.sliding.num_blocks
    assert cache.full.num_blocks == 10
    assert cache.nbytes <= budget
    assert cache.nbytes == sliding_bytes + 10 * BLOCK_BYTES
    rows = sliding_blocks * 4
    shapes = [[tuple(t.shape) for t in kv] for kv in cache.entries]
    assert shapes == [[(rows, KV_HEADS, HEAD_DIM)] * 2] * 3 + [[(40, KV_HEADS, HEAD_DIM)] * 2]
    assert cache.group_of == [SLIDING, SLIDING, SLIDING, FULL]


def test_default_budget_holds_max_num_seqs_typical_sequences_and_one_of_max_model_len() -> None:
    config = _config(MIXED, window=5)
    budget = default_cache_bytes(config, 3, 40, 4, torch.float32, max_num_batched_tokens=8)
    cache = KVCache(config, budget, 3, 4, torch.float32, torch.device("cpu"), max_num_batched_tokens=8)
    assert cache.full.num_blocks == 3 * 10 and cache.nbytes == budget  # short sequences: all of them
    long = default_cache_bytes(config, 3, 20_000, 4, torch.float32, max_num_batched_tokens=8)
    cache = KVCache(config, long, 3, 4, torch.float32, torch.device("cpu"), max_num_batched_tokens=8)
    assert cache.full.num_blocks == 5000  # one whole 20k sequence, more than 3 x 4,096 tokens
    many = default_cache_bytes(config, 8, 20_000, 4, torch.float32, max_num_batched_tokens=8)
    cache = KVCache(config, many, 8, 4, torch.float32, torch.device("cpu"), max_num_batched_tokens=8)
    assert cache.full.num_blocks == 8 * 1024  # 8 x 4,096 tokens, more than one 20k sequence


def test_budget_too_small_for_one_full_block_is_refused() -> None:
    config = _config(MIXED, window=5)
    sliding_bytes = sliding_pool_blocks(config, 4, 4, 2048) * BLOCK_BYTES * 3
    with pytest.raises(ValueError, match="too small"):
        KVCache(config, sliding_bytes + BLOCK_BYTES - 1, 4, 4, torch.float32, torch.device("cpu"))


def test_all_full_and_all_sliding_models() -> None:
    full = _cache(["full_attention"] * 2, full_blocks=6)
    assert full.sliding.num_blocks == 0 and full.full.num_blocks == 6
    assert full.blocks_for(9) == 3
    sliding = _cache(["sliding_attention"] * 2, window=9, max_num_seqs=3)
    assert sliding.full.num_blocks == 0
    assert sliding.blocks_for(10_000) == 0  # length costs a sliding-only model no full blocks
    blocks = SequenceBlocks()
    for end in range(8, 10_000, 8):  # prefill in chunks of 8: the sliding blocks held stay bounded
        sliding.grow(blocks, end)
        sliding.trim(blocks, end)
        assert len(blocks.sliding) - blocks.dropped <= 3
    assert blocks.full == []


# ---------------------------------------------------------------------------------------------- allocation


def test_blocks_are_taken_as_the_sequence_grows() -> None:
    cache = _cache(full_blocks=8, max_num_seqs=2)
    a = SequenceBlocks()
    assert cache.can_grow(a, 32) and not cache.can_grow(a, 33)
    cache.grow(a, 9)  # 3 blocks in each group
    assert len(a.full) == 3 and len(a.sliding) == 3
    cache.grow(a, 12)  # still inside the third block
    assert len(a.full) == 3
    cache.grow(a, 13)
    assert len(a.full) == 4 and cache.full.num_free == 4
    with pytest.raises(MemoryError):
        cache.grow(a, 40)
    assert len(a.full) == 4  # a refused grow takes nothing
    cache.release(a)
    assert a.full == [] and a.sliding == []
    assert cache.full.num_free == 8 and cache.sliding.num_free == cache.sliding.num_blocks


def test_trim_hands_back_exactly_the_sliding_blocks_out_of_the_window() -> None:
    cache = _cache(window=5, full_blocks=16)  # keys seen from position p on: p - 4 and later
    blocks = SequenceBlocks()
    cache.grow(blocks, 20)
    held = list(blocks.sliding)
    cache.trim(blocks, 8)  # queries from 8 see 4..: block 0 (0-3) is out
    assert blocks.sliding[:2] == [DROPPED, held[1]] and cache.sliding.is_free(held[0])
    cache.trim(blocks, 11)  # 7..: block 1 (4-7) is still needed
    assert blocks.sliding[1] == held[1]
    cache.trim(blocks, 12)  # 8..
    assert blocks.sliding[:3] == [DROPPED, DROPPED, held[2]]
    assert len(blocks.full) == 5 and not any(cache.full.is_free(b) for b in blocks.full)
    cache.release(blocks)
    assert cache.sliding.num_free == cache.sliding.num_blocks


def test_usage() -> None:
    cache = _cache(full_blocks=10, max_num_seqs=2)
    total = 10 + cache.sliding.num_blocks
    assert cache.usage() == 0.0
    blocks = SequenceBlocks()
    cache.grow(blocks, 9)  # 3 + 3
    assert cache.usage() == pytest.approx(6 / total)
    cache.release(blocks)
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
            g: torch.full((cache.entries[cache.group_of.index(g)][0].shape[0],), -1)
            for g in set(cache.group_of)
        }

    def step(self, starts: list[int], lengths: list[int], blocks: list[SequenceBlocks]):
        """Runs one step (growing the blocks first, trimming them after); returns
        {group: {(seq, qpos): [visible key positions]}}."""
        for seq_blocks, start, n in zip(blocks, starts, lengths, strict=True):
            self.cache.grow(seq_blocks, start + n)
        batch = self.cache.build(starts, lengths, blocks)
        assert batch.positions.tolist() == [
            p for s, n in zip(starts, lengths, strict=True) for p in range(s, s + n)
        ]
        owner = [i for i, n in enumerate(lengths) for _ in range(n)]
        covered = sorted(int(t) for part in batch.parts for t in part.tokens)
        assert covered == list(range(sum(lengths)))  # every step token in exactly one part
        seen = {}
        for group, store in self.store.items():
            writes = torch.cat([p.groups[group].write_slots for p in batch.parts])
            assert writes.unique().numel() == writes.numel(), "two keys written to one slot"
            for part in batch.parts:  # the step's keys are written before attention reads any key
                index = part.groups[group]
                for t, slot in zip(index.write_tokens.tolist(), index.write_slots.tolist(), strict=True):
                    mine = blocks[owner[t]].full if group == FULL else blocks[owner[t]].sliding
                    assert slot // self.cache.block_size in mine, (
                        "a key written outside its sequence's blocks"
                    )
                store[index.write_slots] = batch.positions[index.write_tokens]
            visible = {}
            for part in batch.parts:
                index = part.groups[group]
                assert index.key_slots.shape[1] >= part.max_query
                assert index.mask.shape == (part.batch, 1, part.max_query, index.key_slots.shape[1])
                # padded query rows included: a row that sees no key would make attention NaN
                assert index.mask.any(-1).all()
                key_pos = store[index.key_slots]
                grid_tokens = torch.full((part.batch * part.max_query,), -1)
                grid_tokens[part.grid_index] = part.tokens
                grid_tokens = grid_tokens.view(part.batch, part.max_query)
                for b in range(part.batch):
                    for j in range(part.max_query):
                        token = int(grid_tokens[b, j])
                        if token < 0:
                            continue
                        seq, qpos = owner[token], int(batch.positions[token])
                        visible[(seq, qpos)] = key_pos[b][index.mask[b, 0, j]].tolist()
            seen[group] = visible
        for seq_blocks, start, n in zip(blocks, starts, lengths, strict=True):
            self.cache.trim(seq_blocks, start + n)
        return seen


def _expected(group: str, qpos: int, window: int) -> list[int]:
    low = 0 if group == FULL else max(0, qpos - window + 1)
    return list(range(low, qpos + 1))


def test_build_mixed_batch_parts_positions_and_masks() -> None:
    cache = _cache(window=5)
    fake = FakeKeys(cache)
    prompt_a = 6
    blocks = [SequenceBlocks() for _ in range(3)]
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
        (5, 4, [3, 1, 1]),  # the window is exactly one block
        (5, 4, [13, 1]),  # a chunk longer than the window
        (6, 4, [2, 7]),  # a window over two blocks
        (7, 2, [1, 1, 5, 2]),
        (3, 4, [9]),
        (1, 2, [4]),  # window 1: a key sees only itself
    ],
)
def test_the_last_window_positions_stay_readable_over_many_steps(
    window: int, block_size: int, chunks: list[int]
) -> None:
    """Three sequences that prefill in chunks, then decode for 30 steps, side by side with offsets."""
    total = 40
    cache = _cache(window=window, block_size=block_size, full_blocks=3 * -(-total // block_size))
    fake = FakeKeys(cache)
    blocks = [SequenceBlocks() for _ in range(3)]
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
    blocks = SequenceBlocks()
    cache.grow(blocks, 12)
    batch = cache.build([0], [12], [blocks])
    (part,) = batch.parts
    for group in (FULL, SLIDING):
        index = part.groups[group]
        assert index.key_slots.shape[1] == 12  # nothing cached: the step's own keys only
        mask = index.mask[0, 0]
        for q in range(12):
            for kp in range(12):
                visible = kp <= q and (group == FULL or q - window < kp)
                assert bool(mask[q, kp]) == visible, (group, q, kp)
    # every key is written in both groups: sliding blocks stay whole, so the prefix cache can reuse them
    for group in (FULL, SLIDING):
        assert sorted(batch.positions[part.groups[group].write_tokens].tolist()) == list(range(12))


def test_latent_attention_caches_one_latent_entry_per_token_and_layer() -> None:
    rank, rope = 12, 4
    config = ModelConfig.from_dict(
        {
            "architectures": ["DeepseekV3ForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "num_attention_heads": 4,
            "n_routed_experts": 8,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "q_lora_rank": 16,
            "kv_lora_rank": rank,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": rope,
            "v_head_dim": 8,
        }
    )
    assert [config.kv_bytes_per_token_layer(2, i) for i in range(3)] == [(rank + rope) * 2] * 3
    budget = default_cache_bytes(config, 2, 40, 4, torch.float32, max_num_batched_tokens=8)
    cache = KVCache(config, budget, 2, 4, torch.float32, torch.device("cpu"), max_num_batched_tokens=8)
    slots = cache.full.num_blocks * 4
    assert cache.full.num_blocks == 2 * 10  # two sequences of 40 tokens, at the latent's size
    assert [[tuple(t.shape) for t in layer] for layer in cache.entries] == [[(slots, 1, rank + rope)]] * 3
    assert cache.nbytes == budget == slots * 3 * (rank + rope) * 4
