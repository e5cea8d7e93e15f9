"""Tool calls and reasoning read from model text: whole, and streamed in pieces of any size."""

from __future__ import annotations

import json

import pytest

from cluster.serve.tools.forced import forced_calls_schema, parse_forced
from cluster.serve.tools.output import OutputReader, message

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
TEXTS = {
    "content-only": "Just words, with a < sign and <tool and <think",
    "one-call": "Let me check.\n" + CALL,
    "two-calls": CALL + "\n" + CALL.replace("Paris", "Rome"),
    "think-then-call": "<think>The user wants weather.</think>\n" + CALL,
    "think-only": "<think>hmm</think>The answer is 4.",
    "unclosed-call": 'Sure <tool_call>{"name": "x"',
    "bad-json-call": "<tool_call>not json</tool_call>after",
}


def _whole(text: str, parser: str = "trinity", tools: bool = True) -> tuple[dict, OutputReader]:
    reader = OutputReader(parser, tools, forced=False)
    return message(reader, reader.feed(text) + reader.finish()), reader


def _streamed(text: str, size: int, parser: str = "trinity") -> tuple[dict, list[dict]]:
    reader = OutputReader(parser, True, forced=False)
    deltas = []
    for start in range(0, len(text), size):
        deltas += reader.feed(text[start : start + size])
    deltas += reader.finish()
    assert all(d and all(v for v in d.values()) for d in deltas), "an empty delta was produced"
    return message(reader, deltas), deltas


def test_hermes_calls_are_parsed_with_json_arguments():
    msg, reader = _whole(TEXTS["two-calls"])
    assert msg["content"] is None
    calls = msg["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome", "days": 2}
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    assert reader.finish_reason("stop") == "tool_calls" and reader.finish_reason("length") == "length"


def test_think_goes_to_reasoning_content():
    msg, _ = _whole(TEXTS["think-then-call"])
    assert msg["reasoning_content"] == "The user wants weather." and len(msg["tool_calls"]) == 1
    msg, _ = _whole(TEXTS["think-only"])
    assert msg == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "hmm"}
    hermes, _ = _whole(TEXTS["think-only"], parser="hermes")
    assert hermes["content"] == TEXTS["think-only"] and "reasoning_content" not in hermes


def test_without_tools_calls_stay_text_and_broken_calls_are_not_invented():
    msg, reader = _whole(TEXTS["one-call"], tools=False)
    assert msg["content"] == TEXTS["one-call"] and not reader.calls
    assert _whole(TEXTS["unclosed-call"])[0]["content"] == TEXTS["unclosed-call"]
    assert _whole(TEXTS["bad-json-call"])[0] == {"role": "assistant", "content": "after"}
    assert _whole(TEXTS["content-only"])[0]["content"] == TEXTS["content-only"]


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_pieces_assemble_to_the_whole_result(name, size):
    whole, _ = _whole(TEXTS[name])
    streamed, deltas = _streamed(TEXTS[name], size)
    strip_ids = lambda m: {**m, "tool_calls": [{**c, "id": None} for c in m.get("tool_calls", [])]}  # noqa: E731
    assert strip_ids(streamed) == strip_ids(whole)
    indexes = [c["index"] for d in deltas for c in d.get("tool_calls", [])]
    assert indexes == list(range(len(indexes)))


def test_forced_calls_follow_the_array_schema():
    functions = [{"name": "a", "parameters": {"type": "object"}}, {"name": "b"}]
    schema = forced_calls_schema(functions, parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    calls = parse_forced('[{"name": "a", "arguments": {"x": 1}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1})]
    assert parse_forced('[{"name": "a", "argu') == []
