"""Prefix caching without a model: block hashes, the hybrid reuse rule, LRU eviction, scheduler reuse."""

import pytest

from router.block_pool import BlockPool
from router.prefix_cache import extend_hashes, longest_prefix, model_root
from router.sampling import SamplingParams, SamplingState
from router.scheduler import Scheduler, SchedulerConfig
from router.sequence import Sequence
from tests.test_scheduler import _cache, _check_blocks, _run

ROOT = model_root("model-a")


def _hashes(tokens: list[int], root: bytes = ROOT, block_size: int = 4) -> list[bytes]:
    out: list[bytes] = []
    extend_hashes(root, tokens, block_size, out)
    return out


@pytest.mark.parametrize("changed", [0, 3, 4, 9, 15])
def test_a_changed_token_changes_its_block_hash_and_every_later_one(changed: int) -> None:
    tokens = list(range(100, 116))  # 4 blocks of 4
    other = list(tokens)
    other[changed] += 1
    a, b = _hashes(tokens), _hashes(other)
    first = changed // 4
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:], strict=True))


def test_hashes_chain_the_whole_prefix_and_the_model() -> None:
    # the same last block after different prefixes is a different block
    assert _hashes([1, 2, 3, 4, 9, 9, 9, 9])[1] != _hashes([5, 6, 7, 8, 9, 9, 9, 9])[1]
    assert _hashes([1, 2, 3, 4]) != _hashes([1, 2, 3, 4], model_root("model-b"))
    assert len(_hashes(list(range(11)))) == 2  # only full blocks are named
    incremental = _hashes(list(range(8)))
    extend_hashes(ROOT, list(range(8, 13)), 4, incremental)  # the tokens after the hashed blocks
    assert incremental == _hashes(list(range(13)))


def _pool_with(hashes: list[bytes], present: list[int]) -> BlockPool:
    pool = BlockPool(len(hashes))
    blocks = pool.allocate(len(hashes))
    for i in present:
        pool.register(blocks[i], hashes[i])
    pool.release(blocks)
    return pool


def test_hybrid_rule_needs_every_full_block_and_only_the_last_window_of_sliding_blocks() -> None:
    hashes = _hashes(list(range(40)))  # 10 blocks of 4
    everything = list(range(10))
    full = _pool_with(hashes, everything)
    # window 9: a prefix of n blocks needs the sliding blocks of positions [4n - 8, 4n): the last two
    sliding = _pool_with(hashes, [6, 7])
    assert longest_prefix(hashes, 10, full, sliding, window=9, block_size=4) == 8
    assert longest_prefix(hashes, 10, full, _pool_with(hashes, [7]), window=9, block_size=4) == 0
    assert longest_prefix(hashes, 10, full, _pool_with(hashes, [2, 3, 7, 8]), 9, 4) == 9
    assert longest_prefix(hashes, 7, full, _pool_with(hashes, everything), 9, 4) == 7  # the limit
    # a missing full block ends the prefix whatever the sliding layers hold
    gap = _pool_with(hashes, [0, 1, 2, 4, 5, 6, 7, 8, 9])
    assert longest_prefix(hashes, 10, gap, _pool_with(hashes, everything), 9, 4) == 3
    # no full-attention layers: only the window matters; no sliding layers: only the full blocks
    assert longest_prefix(hashes, 10, None, sliding, window=9, block_size=4) == 8
    assert longest_prefix(hashes, 10, gap, None, window=9, block_size=4) == 3


def test_free_blocks_stay_cached_and_the_least_recently_freed_is_evicted_first() -> None:
    hashes = _hashes(list(range(12)))
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.register(block, block_hash)
    pool.release([blocks[2]])
    pool.release([blocks[0]])
    assert pool.cached(hashes[2]) == blocks[2] and pool.is_free(blocks[2])  # free, still cached
    (fresh,) = pool.allocate(1)  # the never-used block is the oldest free one
    assert fresh not in blocks and pool.num_cached() == 3
    (taken,) = pool.allocate(1)
    assert taken == blocks[2] and pool.cached(hashes[2]) is None  # evicted, in LRU order
    (taken,) = pool.allocate(1)
    assert taken == blocks[0]
    with pytest.raises(MemoryError):  # block 1 is still referenced: it is never evicted
        pool.allocate(1)
    assert pool.cached(hashes[1]) == blocks[1]


def test_a_cached_block_taken_back_leaves_the_free_queue() -> None:
    hashes = _hashes(list(range(4)))
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.register(block, hashes[0])
    pool.release([block])
    pool.touch([pool.cached(hashes[0])])
    assert not pool.is_free(block) and pool.num_free == 1
    assert pool.allocate(1) != [block]


def _seq(name: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(name, prompt, SamplingState(params, 0), max_len=len(prompt) + max_tokens)


def test_a_new_request_reuses_its_longest_cached_prefix_and_computes_only_the_rest() -> None:
    cache = _cache(full_blocks=32)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), cache)
    prefix = list(range(10, 27))  # 17 tokens: 4 full blocks
    first = _seq("first", [*prefix, 1, 2, 3])
    sched.add(first)
    _run(sched, sched.schedule())
    sched.finish(first, "stop")
    second = _seq("second", [*prefix, 50, 51])
    sched.add(second)
    step = sched.schedule()
    assert step.starts == [16] and step.lengths == [3]
    assert second.cached_tokens == 16
    assert sched.stats.prefix_query_tokens == 20 + 19 and sched.stats.prefix_hit_tokens == 16
    _check_blocks(sched)
    # the whole prompt cached: its last block is computed again, for the logits of the last token
    third = _seq("third", prefix[:16])
    sched.add(third)
    _run(sched, step)
    step = sched.schedule()
    assert dict(zip([s.request_id for s in step.seqs], step.starts, strict=True))["third"] == 12
    assert third.cached_tokens == 12
    _check_blocks(sched)


def test_running_sequences_share_cached_blocks_and_caching_off_shares_nothing() -> None:
    for caching in (True, False):
        cache = _cache(full_blocks=32)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefix_caching=caching), cache)
        a = _seq("a", list(range(9)), max_tokens=8)
        sched.add(a)
        _run(sched, sched.schedule())
        b = _seq("b", list(range(9)), max_tokens=8)
        sched.add(b)
        _run(sched, sched.schedule())
        shared = set(a.blocks.full) & set(b.blocks.full)
        assert len(shared) == (2 if caching else 0)
        assert all(cache.full.refs[x] == 2 for x in shared)
        assert b.cached_tokens == (8 if caching else 0)
        _check_blocks(sched)
        sched.finish(a, "stop")
        assert all(cache.full.refs[x] == 1 for x in shared)
