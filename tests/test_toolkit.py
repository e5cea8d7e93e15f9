"""The shared test tools themselves: the wait helper, the stream parser, the stand-in core."""

from __future__ import annotations

import json
import time

import pytest

from cluster.instance.engine_loop import LoopCore
from tests.toolkit import Stream, StubCore, local_core, wait_for


def test_wait_for_returns_once_the_condition_holds():
    started = time.monotonic()
    assert wait_for(lambda: time.monotonic() - started > 0.2, 5, interval=0.01)
    assert time.monotonic() - started < 2


def test_wait_for_gives_up_at_the_deadline_after_a_last_try():
    calls = []
    started = time.monotonic()
    assert not wait_for(lambda: calls.append(1), 0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 2
    assert len(calls) >= 3


def test_wait_for_tolerates_only_the_exceptions_it_is_told():
    attempts = iter([ConnectionError("replica restarting"), ConnectionError("still"), True])

    def flaky() -> bool:
        outcome = next(attempts)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert wait_for(flaky, 5, interval=0.01, tolerate=(ConnectionError,))
    with pytest.raises(KeyError):
        wait_for(lambda: {}["missing"], 5, tolerate=(ConnectionError,))


def _data(chunk: dict | str) -> str:
    return f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}"


def test_stream_parses_a_well_formed_completion_stream():
    stream = Stream("p", status=200)
    for line in [
        _data({"choices": [{"text": "Hel", "finish_reason": None}]}),
        "",
        _data({"choices": [{"text": "lo", "finish_reason": "length"}]}),
        _data({"choices": [], "usage": {"completion_tokens": 2}}),
        _data("[DONE]"),
    ]:
        stream.feed(line)
    assert stream.text == "Hello" and stream.complete
    stream.check()


@pytest.mark.parametrize(
    "lines",
    [
        [": not data"],
        [_data({"error": {"message": "boom"}})],
        [_data("[DONE]"), _data({"choices": []})],
        [
            _data({"choices": [{"text": "a", "finish_reason": "stop"}]}),
            _data({"choices": [{"text": "b", "finish_reason": None}]}),
        ],
    ],
    ids=["not-sse", "error-event", "after-done", "after-finish"],
)
def test_stream_records_every_malformed_event(lines):
    stream = Stream("p", status=200)
    for line in lines:
        stream.feed(line)
    assert stream.errors and not stream.complete


def test_the_stub_and_the_real_core_both_implement_what_engine_loop_needs(demo_model):
    assert isinstance(StubCore(), LoopCore)
    assert isinstance(local_core(demo_model, shards=1), LoopCore)
