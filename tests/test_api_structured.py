"""Structured outputs through real HTTP with the openai client: response_format json_schema / json_object,
on chat and on completions."""

from __future__ import annotations

import json

import jsonschema
import pytest

from router.tokenizer import Tokenizer
from tests.api_helpers import api_app, refused, stream_texts
from tests.json_schemas import SCHEMAS

CHAT = [{"role": "user", "content": "Describe it as JSON"}]
PROMPT = "A record, as JSON:"

api_url = api_app("structured", max_model_len=512)


def _format(index: int) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": f"s{index}", "schema": SCHEMAS[index], "strict": True},
    }


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_each_schema_validates_every_time(client, model_name, index):
    out = client.chat.completions.create(
        model=model_name,
        messages=CHAT,
        response_format=_format(index),
        max_tokens=300,
        temperature=1.0,
        seed=index,
        n=3,
    )
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[index])


def test_streamed_structured_output_equals_the_whole_one(client, model_name):
    request = dict(
        model=model_name, messages=CHAT, response_format=_format(12), max_tokens=300, temperature=1.0, seed=4
    )
    whole = client.chat.completions.create(**request).choices[0].message.content
    texts, finish, _ = stream_texts(client, chat=True, **request)
    assert texts[0] == whole and finish[0] == "stop"
    jsonschema.validate(json.loads(whole), SCHEMAS[12])


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_each_schema_validates_on_completions(client, model_name, index):
    """Even schemas whole, odd ones streamed; each streamed text is also the whole one of its seed."""
    request = dict(
        model=model_name,
        prompt=PROMPT,
        max_tokens=300,
        temperature=1.0,
        seed=100 + index,
        n=2,
        extra_body={"response_format": _format(index)},
    )
    whole = client.completions.create(**request)
    texts = {c.index: c.text for c in whole.choices}
    assert sorted(texts) == [0, 1] and {c.finish_reason for c in whole.choices} == {"stop"}, whole
    if index % 2:
        streamed, finish, _ = stream_texts(client, chat=False, **request)
        assert streamed == texts and set(finish.values()) == {"stop"}
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMAS[index])


def _closing_bias(demo_model) -> dict[str, int]:
    """Free keys end when the model closes them: a push towards '"}' keeps json_object outputs short."""
    return {str(t): 8 for t in Tokenizer.from_model_dir(demo_model).encode('"}')}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_object_on_completions_gives_an_object(client, model_name, demo_model, stream):
    request = dict(
        model=model_name,
        prompt=PROMPT,
        logit_bias=_closing_bias(demo_model),
        max_tokens=400,
        temperature=1.0,
        seed=2,
        n=2,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if stream:
        texts, finish, _ = stream_texts(client, chat=False, **request)
    else:
        out = client.completions.create(**request)
        texts = {c.index: c.text for c in out.choices}
        finish = {c.index: c.finish_reason for c in out.choices}
    assert set(finish.values()) == {"stop"}, finish
    for text in texts.values():
        assert isinstance(json.loads(text), dict)


def test_json_object_gives_an_object_and_shares_a_batch_with_free_text(client, model_name, demo_model):
    bias = _closing_bias(demo_model)
    free = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=8, temperature=0)
    out = client.chat.completions.create(
        model=model_name,
        messages=CHAT,
        response_format={"type": "json_object"},
        logit_bias=bias,
        max_tokens=400,
        temperature=1.0,
        seed=1,
        n=4,
    )
    for choice in out.choices:
        assert isinstance(json.loads(choice.message.content), dict)
    again = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == free.choices[0].message.content


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            "response_format.json_schema.schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": -1}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "response_format.json_schema"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_invalid_response_format_is_400_and_the_server_keeps_serving(
    client, model_name, endpoint, stream, response_format, param
):
    body = {"model": model_name, "max_tokens": 4, "response_format": response_format}
    body |= {"messages": CHAT} if endpoint == "chat/completions" else {"prompt": PROMPT}
    error = refused(client, endpoint, body, stream)
    assert error["param"] == param, error
