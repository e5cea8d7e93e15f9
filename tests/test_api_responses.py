"""/v1/responses through real HTTP with the openai client: text, streaming, function tools, bad input."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.api_helpers import TIME, api_app, refused

TOOL = {"type": "function", **TIME["function"]}  # Responses' flat function tool

api_url = api_app("responses", max_model_len=512)  # room for the tool's description and a forced call


def test_text_response_equals_the_chat_completion(client, model_name):
    out = client.responses.create(model=model_name, input="Hi", max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0
    )
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens
    assert out.status in ("completed", "incomplete") and out.id.startswith("resp_")


def test_streamed_response_equals_the_whole_one(client, model_name):
    request = dict(
        model=model_name, input="Tell me", instructions="Be brief", max_output_tokens=20, temperature=0
    )
    whole = client.responses.create(**request)
    events = list(client.responses.create(stream=True, **request))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text and events[-1].response.output_text == text
    assert all(e.delta for e in events if e.type == "response.output_text.delta")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_required_function_call(client, model_name, stream):
    request = dict(
        model=model_name,
        input="What time is it?",
        tools=[TOOL],
        tool_choice="required",
        max_output_tokens=200,
        temperature=1.0,
    )
    if stream:
        events = list(client.responses.create(stream=True, **request))
        output = events[-1].response.output
    else:
        output = client.responses.create(**request).output
    calls = [item for item in output if item.type == "function_call"]
    assert calls and all(c.name == "get_time" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    # the call and its output go back as input items
    follow = client.responses.create(
        model=model_name,
        tools=[TOOL],
        max_output_tokens=4,
        temperature=0,
        input=[
            {"role": "user", "content": "What time is it?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_time",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "12:00"},
        ],
    )
    assert follow.usage.input_tokens > 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": []}, "input"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]},
            "messages.0.tool_call_id",
        ),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_responses_requests_are_400(client, model_name, fields, param, stream):
    body = {"model": model_name, "input": "Hi", "max_output_tokens": 2, **fields}
    error = refused(client, "responses", body, stream)
    assert (error["param"] or "").startswith(param), error
