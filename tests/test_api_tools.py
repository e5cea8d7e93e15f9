"""Tool calling through real HTTP with the openai client, on a checkpoint whose template uses Hermes tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from cluster.instance.prompts import PromptEncoder
from tests.api_helpers import TIME, api_app, refused

HERMES_TEMPLATE = """{{ bos_token }}
{%- if tools %}<|im_start|>system
<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Call a function as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "tool" %}<|im_start|>user
<tool_response id="{{ m.tool_call_id }}">{{ m.content }}</tool_response><|im_end|>
{% elif m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": \
{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_model(demo_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(demo_model, path)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


api_url = api_app("tools", "tool_model", max_model_len=1024, tool_call_parser="hermes")


def _assert_valid_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_required_returns_calls_that_validate(client, model_name, seed):
    out = client.chat.completions.create(
        model=model_name,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=seed,
        max_tokens=400,
        parallel_tool_calls=False,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _assert_valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_a_named_function_is_the_one_called(client, model_name):
    out = client.chat.completions.create(
        model=model_name,
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=5,
        max_tokens=400,
        n=2,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        _assert_valid_calls(choice.message.tool_calls, {"get_time"})


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_streamed_tool_call_deltas_assemble_to_the_whole_call(client, model_name, tool_choice):
    request = dict(
        model=model_name,
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=1.0,
        seed=8,
        max_tokens=400,
    )
    whole = client.chat.completions.create(**request).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"type": None, "id": "", "name": "", "arguments": ""})
                call["type"] = delta.type or call["type"]
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    expected = [
        {"type": "function", "name": c.function.name, "arguments": c.function.arguments}
        for c in whole.message.tool_calls
    ]
    assert [{k: v for k, v in calls[i].items() if k != "id"} for i in sorted(calls)] == expected
    assert all(call["id"] for call in calls.values()) and finish == "tool_calls"
    _assert_valid_calls(whole.message.tool_calls, {"get_weather", "get_time"})


def test_a_multi_turn_conversation_with_tool_results_reaches_the_template(client, model_name, tool_model):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    messages = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    out = client.chat.completions.create(
        model=model_name, messages=messages, tools=TOOLS, max_tokens=3, temperature=0
    )
    encoder = PromptEncoder(tool_model)
    template_messages = [
        *ASK,
        {
            **messages[1],
            "tool_calls": [
                {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
            ],
        },
        messages[2],
    ]
    rendered = encoder.tokenizer.hf.apply_chat_template(
        template_messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'
        in rendered
    )
    assert '<tool_response id="call_1">sunny, 21 C</tool_response>' in rendered and '"get_time"' in rendered
    assert out.usage.prompt_tokens == len(encoder.chat(template_messages, TOOLS))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
            "messages.1.tool_call_id",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_tool_requests_are_400_and_the_server_keeps_serving(client, model_name, fields, param, stream):
    body = {"model": model_name, "messages": ASK, "max_tokens": 2, **fields}
    error = refused(client, "chat/completions", body, stream)
    assert (error["param"] or "").startswith(param), error
