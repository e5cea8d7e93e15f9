"""What the test_api_* modules share: one Serve app per module, refusals through the openai client,
streamed choices.

A module names its app once, `api_url = api_app("name", ...)`; the `client`, `http` and `model_name`
fixtures are tests/serve_api_app.py's (a plugin), and they read that module's `api_url`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from tests.conftest import served_app, small_app
from tests.toolkit import error_object

APP_DEFAULTS = {"expert_shards": 1, "max_model_len": 256, "max_num_seqs": 32}
PROMPT_FIELD = {"completions": "prompt", "chat/completions": "messages", "responses": "input"}
TIME = {  # a chat tool (test_api_tools.py; flat, test_api_responses.py)
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def api_app(name: str, model: str = "demo_model", **options: object) -> Callable:
    """The module's `api_url` fixture: the real app at /<name>, serving the checkpoint of fixture `model`
    on one expert shard (what these modules test is the API, not the exchange)."""

    @pytest.fixture(scope="module")
    def api_url(serve_http: str, request: pytest.FixtureRequest) -> Iterator[str]:
        path = request.getfixturevalue(model)
        with served_app(serve_http, name, small_app(path, **{**APP_DEFAULTS, **options})) as url:
            yield url

    return api_url


def refused(client: openai.OpenAI, endpoint: str, body: dict, stream: bool = False) -> dict:
    """Sends `body` with the openai client's own create method for `endpoint`; asserts a 400 with an
    OpenAI error body (before any stream starts) and that the server serves the next request.
    Returns the error object."""
    create = {
        "completions": client.completions.create,
        "chat/completions": client.chat.completions.create,
        "responses": client.responses.create,
    }[endpoint]
    fields = dict(body)
    named = {k: fields.pop(k) for k in ("model", PROMPT_FIELD[endpoint]) if k in fields}
    with pytest.raises(openai.BadRequestError) as caught:
        create(**named, stream=stream, extra_body=fields)
    error = error_object(caught.value.response.json())
    after = client.completions.create(model=body["model"], prompt="Hi", max_tokens=1, temperature=0)
    assert after.usage.completion_tokens == 1
    return error


def stream_texts(client: openai.OpenAI, chat: bool, **request) -> tuple[dict[int, str], dict[int, str], list]:
    """Each choice's text and finish reason from a stream, and every chunk (for shape checks)."""
    create = client.chat.completions.create if chat else client.completions.create
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(create(stream=True, **request))
    for chunk in chunks:
        for choice in chunk.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks
