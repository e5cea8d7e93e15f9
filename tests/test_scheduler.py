import pytest
import torch

from router.config import ModelConfig
from router.errors import QueueFull
from router.kv_cache import KVCache
from router.sampling import SamplingParams, SamplingState
from router.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from router.sequence import Sequence, Status

BLOCK = 4


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _cache(full_blocks: int = 64, max_num_seqs: int = 8) -> KVCache:
    """One sliding layer (window 5: a one-block ring) and one full layer; fp32, 2 KV heads of 8."""
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
    budget = (max_num_seqs + full_blocks) * block_bytes
    cache = KVCache(config, budget, max_num_seqs, BLOCK, torch.float32, torch.device("cpu"))
    assert cache.full_blocks.num_blocks == full_blocks and cache.ring_blocks.num_blocks == max_num_seqs
    return cache


def _seq(name: str, prompt: int, max_tokens: int = 8) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(name, list(range(prompt)), SamplingState(params, 0), max_len=prompt + max_tokens)


def _run(step: ScheduledStep) -> None:
    """What the engine does after a step: count computed tokens, append a token where one is sampled."""
    for seq, start, n, samples in zip(step.seqs, step.starts, step.lengths, step.samples, strict=True):
        assert start == seq.num_computed
        seq.num_computed += n
        assert samples == (seq.num_computed == seq.num_tokens)
        if samples:
            seq.output_ids.append(1)


def _lengths(step: ScheduledStep | None) -> dict[str, int]:
    return {} if step is None else {s.request_id: n for s, n in zip(step.seqs, step.lengths, strict=True)}


def test_decodes_are_scheduled_before_prefills() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), _cache())
    a, b = _seq("a", 3), _seq("b", 2)
    sched.add(a)
    sched.add(b)
    _run(sched.schedule())  # both prompts fit: a and b decode from now on
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
    _run(sched.schedule())  # short prefilled, now decoding
    sched.add(long)
    _run(sched.schedule())  # short decodes, long takes 3 of its 10
    sched.running.reverse()  # running order: long (prefilling), short (decoding)
    step = sched.schedule()
    assert _lengths(step) == {"short": 1, "long": 3}
    assert [s.request_id for s in step.seqs] == ["short", "long"]


def test_a_long_prompt_is_chunked_while_a_decode_runs_every_step() -> None:
    budget = 5
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), _cache())
    decoder = _seq("decoder", 2, max_tokens=30)
    sched.add(decoder)
    _run(sched.schedule())
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
        _run(step)
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
        _run(step)
        for seq in list(step.seqs):
            if len(seq.output_ids) >= seq.sampling.params.max_tokens:
                sched.finish(seq, "length")
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
    _run(step)
    for _ in range(3):
        step = sched.schedule()
        assert len(step.seqs) == 2 and len(sched.running) == 2
        _run(step)
    assert [s.status for s in seqs] == [Status.RUNNING] * 2 + [Status.WAITING] * 3
    sched.finish(seqs[0], "stop")
    step = sched.schedule()
    assert _lengths(step) == {"s1": 1, "s2": 3}


def test_admission_waits_for_kv_blocks_and_proceeds_after_finish() -> None:
    cache = _cache(full_blocks=5)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), cache)
    first = _seq("first", 8, max_tokens=4)  # 12 tokens: 3 blocks
    second = _seq("second", 5, max_tokens=4)  # 9 tokens: 3 blocks, only 2 left
    sched.add(first)
    sched.add(second)
    step = sched.schedule()
    assert _lengths(step) == {"first": 8}
    assert second.status == Status.WAITING and second.blocks is None
    _run(step)
    assert _lengths(sched.schedule()) == {"first": 1}
    sched.finish(first, "stop")
    step = sched.schedule()
    assert _lengths(step) == {"second": 5}
    assert second.status == Status.RUNNING and len(second.blocks.full) == 3


def test_admission_waits_for_a_sliding_window_ring() -> None:
    cache = _cache(full_blocks=64, max_num_seqs=1)  # one ring in the whole cache
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), cache)
    a, b = _seq("a", 3), _seq("b", 3)
    sched.add(a)
    sched.add(b)
    assert _lengths(sched.schedule()) == {"a": 3}
    sched.finish(a, "stop")
    assert _lengths(sched.schedule()) == {"b": 3}


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
    _run(sched.schedule())
    assert cache.full_blocks.num_free == 7 and cache.ring_blocks.num_free == 1
    sched.finish(running, "length")
    assert running.status == Status.FINISHED and running.finish_reason == "length"
    assert running.blocks is None and running not in sched.running
    assert cache.full_blocks.num_free == 10 and cache.ring_blocks.num_free == 2
    assert cache.usage() == 0.0
    sched.add(waiting)
    sched.finish(waiting, "abort")  # a waiting sequence holds no blocks; it just leaves the queue
    assert waiting.status == Status.FINISHED and not sched.waiting
    assert cache.full_blocks.num_free == 10
    assert not sched.has_work() and sched.schedule() is None
