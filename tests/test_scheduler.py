import pytest
import torch

from router.config import ModelConfig
from router.errors import QueueFull
from router.kv_cache import DROPPED, KVCache, sliding_pool_blocks
from router.sampling import SamplingParams, SamplingState
from router.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from router.sequence import Sequence, Status

BLOCK = 4


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _cache(full_blocks: int = 64, max_num_seqs: int = 8) -> KVCache:
    """One sliding layer (window 5: one block of window) and one full layer; fp32, 2 KV heads of 8."""
    config = ModelConfig.from_dict(
        {
            "architectures": ["AfmoeForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 5,
            "layer_types": ["sliding_attention", "full_attention"],
        }
    )
    block_bytes = 2 * BLOCK * 2 * 8 * 4
    budget = (sliding_pool_blocks(config, max_num_seqs, BLOCK, 64) + full_blocks) * block_bytes
    cache = KVCache(config, budget, max_num_seqs, BLOCK, torch.float32, torch.device("cpu"), 64)
    assert cache.full.num_blocks == full_blocks
    return cache


def _seq(name: str, prompt: int, max_tokens: int = 8) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(name, list(range(prompt)), SamplingState(params, 0), max_len=prompt + max_tokens)


def _run(sched: Scheduler, step: ScheduledStep, token: int = 1) -> None:
    """What the engine does after a step: count computed tokens, append a token where one is sampled."""
    for seq, start, n in zip(step.seqs, step.starts, step.lengths, strict=True):
        assert start == seq.num_computed
        assert len(seq.blocks.full) * BLOCK >= start + n, "a step computes tokens without their blocks"
    sched.computed(step)
    for seq, samples in zip(step.seqs, step.samples, strict=True):
        assert samples == (seq.num_computed == seq.num_tokens)
        if samples:
            seq.output_ids.append(token)


def _run_and_finish(sched: Scheduler, step: ScheduledStep) -> None:
    """_run, then finish the sequences that reached their max_tokens."""
    _run(sched, step)
    for seq in list(step.seqs):
        if len(seq.output_ids) >= seq.sampling.params.max_tokens:
            sched.finish(seq, "length")


def _lengths(step: ScheduledStep | None) -> dict[str, int]:
    return {} if step is None else {s.request_id: n for s, n in zip(step.seqs, step.lengths, strict=True)}


def test_decodes_are_scheduled_before_prefills() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), _cache())
    a, b = _seq("a", 3), _seq("b", 2)
    sched.add(a)
    sched.add(b)
    _run(sched, sched.schedule())  # both prompts fit: a and b decode from now on
    c = _seq("c", 20)
    sched.add(c)
    step = sched.schedule()
    assert [s.request_id for s in step.seqs] == ["a", "b", "c"]
    assert step.lengths == [1, 1, 6]
    assert step.samples == [True, True, False]


def test_decodes_go_first_whatever_the_running_order() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4), _cache())
    long, short = _seq("long", 10), _seq("short", 2)
    sched.add(short)
    _run(sched, sched.schedule())  # short prefilled, now decoding
    sched.add(long)
    _run(sched, sched.schedule())  # short decodes, long takes 3 of its 10
    sched.running.reverse()  # running order: long (prefilling), short (decoding)
    step = sched.schedule()
    assert _lengths(step) == {"short": 1, "long": 3}
    assert [s.request_id for s in step.seqs] == ["short", "long"]


def test_a_long_prompt_is_chunked_while_a_decode_runs_every_step() -> None:
    budget = 5
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), _cache())
    decoder = _seq("decoder", 2, max_tokens=30)
    sched.add(decoder)
    _run(sched, sched.schedule())
    prompt = 17
    sched.add(_seq("long", prompt))
    chunks = []
    while True:
        step = sched.schedule()
        lengths = _lengths(step)
        assert sum(step.lengths) <= budget
        assert lengths["decoder"] == 1 and step.seqs[0] is decoder
        chunks.append(lengths.get("long", 0))
        long_done = dict(zip([s.request_id for s in step.seqs], step.samples, strict=True)).get("long", False)
        _run(sched, step)
        if long_done:
            break
    assert chunks == [4, 4, 4, 4, 1]  # the prompt spread over steps, never starving the decode
    assert sum(chunks) == prompt
    step = sched.schedule()
    assert _lengths(step) == {"decoder": 1, "long": 1}


def test_step_tokens_never_exceed_the_budget() -> None:
    budget = 7
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), _cache())
    for i, prompt in enumerate([9, 1, 15, 3, 6, 2]):
        sched.add(_seq(f"s{i}", prompt, max_tokens=4))
    steps = 0
    while sched.has_work():
        step = sched.schedule()
        assert step is not None and 0 < sum(step.lengths) <= budget
        assert all(n > 0 for n in step.lengths)
        _run_and_finish(sched, step)
        steps += 1
        assert steps < 100
    assert sched.schedule() is None


def test_max_num_seqs_is_respected() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), _cache())
    seqs = [_seq(f"s{i}", 3) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    step = sched.schedule()
    assert [s.request_id for s in step.seqs] == ["s0", "s1"]
    _run(sched, step)
    for _ in range(3):
        step = sched.schedule()
        assert len(step.seqs) == 2 and len(sched.running) == 2
        _run(sched, step)
    assert [s.status for s in seqs] == [Status.RUNNING] * 2 + [Status.WAITING] * 3
    sched.finish(seqs[0], "stop")
    step = sched.schedule()
    assert _lengths(step) == {"s1": 1, "s2": 3}


def test_admission_waits_for_kv_blocks_and_proceeds_after_finish() -> None:
    cache = _cache(full_blocks=4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefix_caching=False), cache)
    first = _seq("first", 9, max_tokens=4)  # its prompt takes 3 blocks
    second = _seq("second", 5, max_tokens=4)  # its prompt needs 2, only 1 left
    sched.add(first)
    sched.add(second)
    step = sched.schedule()
    assert _lengths(step) == {"first": 9}
    assert second.status == Status.WAITING and second.blocks is None
    _run(sched, step)
    assert _lengths(sched.schedule()) == {"first": 1}
    sched.finish(first, "stop")
    step = sched.schedule()
    assert _lengths(step) == {"second": 5}
    assert second.status == Status.RUNNING and len(second.blocks.full) == 2


def test_queue_full_once_slots_and_waiting_places_are_taken() -> None:
    """Requests beyond the free sequence slots wait, at most max_waiting of them."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_waiting=2), _cache())
    for name in "abc":  # one for the slot, two waiting
        sched.add(_seq(name, 2))
    with pytest.raises(QueueFull):
        sched.add(_seq("d", 2))
    assert len(sched.waiting) == 3
    sched.schedule()  # a takes the slot: still 1 running + 2 waiting, no room
    with pytest.raises(QueueFull):
        sched.add(_seq("d", 2))
    sched.finish(sched.running[0], "stop")
    sched.add(_seq("d", 2))
    assert sched.num_active == 3


def test_max_waiting_zero_admits_only_what_the_slots_hold() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_waiting=0), _cache())
    sched.add(_seq("a", 2))
    sched.add(_seq("b", 2))
    with pytest.raises(QueueFull):
        sched.add(_seq("c", 2))


def test_finish_releases_blocks_and_forgets_the_sequence() -> None:
    cache = _cache(full_blocks=10, max_num_seqs=2)
    sched = Scheduler(SchedulerConfig(), cache)
    running, waiting = _seq("running", 6, max_tokens=6), _seq("waiting", 2)
    sched.add(running)
    _run(sched, sched.schedule())
    assert cache.full.num_free == 8 and cache.sliding.num_used == 2
    sched.finish(running, "length")
    assert running.status == Status.FINISHED and running.finish_reason == "length"
    assert running.blocks is None and running not in sched.running
    assert cache.full.num_free == 10 and cache.sliding.num_used == 0
    assert cache.usage() == 0.0
    sched.add(waiting)
    sched.finish(waiting, "abort")  # a waiting sequence holds no blocks; it just leaves the queue
    assert waiting.status == Status.FINISHED and not sched.waiting
    assert cache.full.num_free == 10
    assert not sched.has_work() and sched.schedule() is None


# ---------------------------------------------------------------------------------------------- preemption


def _check_blocks(sched: Scheduler) -> None:
    """Every reference a running sequence holds is counted, and no block is both free and in use."""
    cache = sched.cache
    for pool, tables in (
        (cache.full, [s.blocks.full for s in sched.running]),
        (cache.sliding, [[b for b in s.blocks.sliding if b != DROPPED] for s in sched.running]),
    ):
        held = [0] * pool.num_blocks
        for table in tables:
            for block in table:
                held[block] += 1
        assert held == pool.refs
        for block in range(pool.num_blocks):
            assert pool.is_free(block) == (pool.refs[block] == 0), f"block {block}"
    assert all(s.blocks is None for s in sched.waiting)


def test_the_most_recently_admitted_sequence_is_preempted_and_all_its_blocks_freed() -> None:
    cache = _cache(full_blocks=6)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefix_caching=False), cache)
    seqs = {name: _seq(name, 8, max_tokens=20) for name in "abc"}  # 2 blocks each: the cache is full
    for seq in seqs.values():
        sched.add(seq)
    _run(sched, sched.schedule())
    assert cache.full.num_free == 0 and [s.request_id for s in sched.running] == ["a", "b", "c"]
    c_full, c_sliding = list(seqs["c"].blocks.full), list(seqs["c"].blocks.sliding)
    step = sched.schedule()  # a needs a third block: c, the newest, makes room; b then takes c's other one
    assert _lengths(step) == {"a": 1, "b": 1}
    assert sched.stats.preemptions == 1
    c = seqs["c"]
    assert c.status == Status.WAITING and c.blocks is None and c.num_computed == 0
    assert list(sched.waiting) == [c]
    a, b = seqs["a"].blocks, seqs["b"].blocks
    assert sorted(c_full) == sorted([a.full[2], b.full[2]])  # c's blocks went to a and b's new tokens
    assert all(cache.sliding.refs[x] == 0 or x in a.sliding + b.sliding for x in c_sliding)
    _check_blocks(sched)
    _run(sched, step)
    for _ in range(3):  # a and b decode inside their third block
        _run(sched, sched.schedule())
    step = sched.schedule()  # both want a fourth block, none is free: b (newer than a) goes
    assert _lengths(step) == {"a": 1} and sched.stats.preemptions == 2
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # preempted ones keep their order
    _check_blocks(sched)


def test_a_preempted_sequence_is_recomputed_from_prompt_and_output() -> None:
    cache = _cache(full_blocks=5)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefix_caching=False), cache)
    a, b = _seq("a", 8, max_tokens=8), _seq("b", 8, max_tokens=8)
    sched.add(a)
    sched.add(b)
    while b.status is not Status.WAITING or not b.output_ids:
        step = sched.schedule()
        _run(sched, step, token=7)
    assert b.num_computed == 0 and b.output_ids
    generated = len(b.output_ids)
    sched.finish(a, "stop")
    step = sched.schedule()
    assert _lengths(step) == {"b": 8 + generated} and step.samples == [True]  # one step: prompt + output
    assert step.starts == [0]
    _check_blocks(sched)


def test_a_sequence_alone_that_cannot_grow_preempts_itself_and_waits() -> None:
    cache = _cache(full_blocks=2)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, prefix_caching=False), cache)
    a = _seq("a", 8, max_tokens=4)
    sched.add(a)
    _run(sched, sched.schedule())
    assert sched.schedule() is None  # a's next token needs a third block that does not exist
    assert a.status is Status.WAITING and cache.full.num_free == 2
    _check_blocks(sched)


def test_random_workload_keeps_block_accounting_exact() -> None:
    """Shared prefixes, a small cache, preemptions and finishes: the invariants hold after every step."""
    generator = torch.Generator().manual_seed(0)
    cache = _cache(full_blocks=24)
    sched = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16), cache)
    shared = list(range(40, 52))
    for i in range(30):
        tail = torch.randint(
            0, 64, (int(torch.randint(1, 12, (1,), generator=generator)),), generator=generator
        )
        prompt = shared[: int(torch.randint(0, 13, (1,), generator=generator))] + tail.tolist()
        params = SamplingParams(max_tokens=int(torch.randint(1, 16, (1,), generator=generator)))
        sched.add(
            Sequence(f"s{i}", prompt, SamplingState(params, 0), max_len=len(prompt) + params.max_tokens)
        )
    steps = 0
    while sched.has_work():
        step = sched.schedule()
        _check_blocks(sched)
        if step is not None:
            _run_and_finish(sched, step)
        steps += 1
        assert steps < 2000
    assert sched.stats.preemptions > 0 and sched.stats.prefix_hit_tokens > 0
    assert cache.full.num_used == 0 and cache.sliding.num_used == 0
