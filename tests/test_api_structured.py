"""Structured outputs through real HTTP with the openai client: response_format json_schema / json_object."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest

from router.tokenizer import Tokenizer
from tests.api_helpers import (
    app_options,
    client,
    http,
    model_name,
    openai_error,
    served,
    stream_texts,
)
from tests.json_schemas import SCHEMAS

CHAT = [{"role": "user", "content": "Describe it as JSON"}]


@pytest.fixture(scope="module")
def api_url(serve_http, demo_model) -> Iterator[str]:
    with served(serve_http, "structured", app_options(demo_model, max_model_len=512)) as url:
        yield url


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


def test_json_object_gives_an_object_and_shares_a_batch_with_free_text(client, model_name, demo_model):
    closing = Tokenizer.from_model_dir(demo_model).encode('"}')  # free keys end when the model closes them
    bias = {str(t): 8 for t in closing}
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
def test_invalid_response_format_is_400_and_the_server_keeps_serving(
    http, model_name, response_format, param
):
    body = {"model": model_name, "messages": CHAT, "max_tokens": 4, "response_format": response_format}
    error = openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param, error
    assert http.post("/v1/chat/completions", json={**body, "response_format": None}).status_code == 200
