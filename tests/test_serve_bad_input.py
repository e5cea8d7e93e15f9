"""Bad input to the "api" app (tests/serve_api_app.py): every malformed request gets a 4xx with an OpenAI
error body, never a 500 or a hang, and the server keeps serving.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.serve_api_app import (
    EOS_PROMPT,
    MAX_MODEL_LEN,
    MAX_REQUEST_BYTES,
)
from tests.toolkit import openai_error

# ------------------------------------------------------------------------------------------- bad input

DROP = object()
C, H = "completions", "chat/completions"


def _body(endpoint: str, served: str, fields: dict) -> dict:
    base = {"model": served, "max_tokens": 2}
    if endpoint == C:
        base["prompt"] = "Hello"
    else:
        base["messages"] = [{"role": "user", "content": "Hi"}]
    return {k: v for k, v in (base | fields).items() if v is not DROP}


# (id, endpoint, fields to set (DROP: remove), expected status, expected param, or None: not checked)
BAD_FIELDS = [
    ("wrong-type-model", C, {"model": 3}, 400, "model"),
    ("wrong-type-prompt", C, {"prompt": 5}, 400, None),
    ("wrong-type-prompt-floats", C, {"prompt": [1.5, 2]}, 400, None),
    ("wrong-type-prompt-mixed-list", C, {"prompt": ["a", 1]}, 400, None),
    ("wrong-type-max-tokens", C, {"max_tokens": "5"}, 400, "max_tokens"),
    ("wrong-type-max-tokens-float", C, {"max_tokens": 2.5}, 400, "max_tokens"),
    ("wrong-type-temperature", C, {"temperature": "hot"}, 400, "temperature"),
    ("wrong-type-temperature-numeric-string", C, {"temperature": "0.5"}, 400, "temperature"),
    ("wrong-type-temperature-bool", H, {"temperature": True}, 400, "temperature"),
    ("wrong-type-top-p", H, {"top_p": "x"}, 400, "top_p"),
    ("wrong-type-n", C, {"n": "2"}, 400, "n"),
    ("wrong-type-stream", C, {"stream": "yes"}, 400, "stream"),
    ("wrong-type-stop", C, {"stop": 5}, 400, None),
    ("wrong-type-stop-list", H, {"stop": [1]}, 400, None),
    ("wrong-type-seed", C, {"seed": "1"}, 400, None),
    ("wrong-type-top-k", C, {"top_k": 1.5}, 400, "top_k"),
    ("wrong-type-logprobs", C, {"logprobs": "3"}, 400, None),
    ("wrong-type-chat-logprobs", H, {"logprobs": "yes"}, 400, "logprobs"),
    ("wrong-type-stream-options", H, {"stream_options": "x"}, 400, None),
    ("missing-model", C, {"model": DROP}, 400, "model"),
    ("missing-prompt", C, {"prompt": DROP}, 400, "prompt"),
    ("missing-messages", H, {"messages": DROP}, 400, "messages"),
    ("unknown-model", C, {"model": "gpt-4o"}, 404, "model"),
    ("unknown-model-chat", H, {"model": "gpt-4o"}, 404, "model"),
    ("unknown-model-streaming", C, {"model": "gpt-4o", "stream": True}, 404, "model"),
    ("prompt-longer-than-max-model-len", C, {"prompt": "word " * 300}, 400, "prompt"),
    ("prompt-ids-as-long-as-max-model-len", C, {"prompt": [5] * MAX_MODEL_LEN}, 400, "prompt"),
    ("prompt-too-long-streaming", C, {"prompt": [5] * 300, "stream": True}, 400, "prompt"),
    (
        "chat-longer-than-max-model-len",
        H,
        {"messages": [{"role": "user", "content": "word " * 300}]},
        400,
        None,
    ),
    ("empty-prompt-ids", C, {"prompt": []}, 400, None),
    ("empty-prompt-ids-n3", C, {"prompt": [], "n": 3}, 400, None),
    ("prompt-too-long-n2-streaming", C, {"prompt": [5] * 300, "n": 2, "stream": True}, 400, "prompt"),
    ("chat-too-long-n2", H, {"messages": [{"role": "user", "content": "word " * 300}], "n": 2}, 400, None),
    ("token-id-outside-vocab", C, {"prompt": [1, 10**6]}, 400, None),
    ("negative-token-id", C, {"prompt": [-1]}, 400, None),
    ("max-tokens-zero", C, {"max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", H, {"max_tokens": -5}, 400, "max_tokens"),
    ("max-completion-tokens-zero", H, {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("temperature-negative", C, {"temperature": -0.5}, 400, "temperature"),
    ("temperature-negative-chat", H, {"temperature": -1}, 400, "temperature"),
    ("temperature-above-2", C, {"temperature": 2.5}, 400, "temperature"),
    ("top-p-zero", C, {"top_p": 0}, 400, "top_p"),
    ("top-p-above-1", H, {"top_p": 1.5}, 400, "top_p"),
    ("top-p-negative", C, {"top_p": -0.1}, 400, "top_p"),
    ("top-k-negative", C, {"top_k": -1}, 400, "top_k"),
    ("n-zero", C, {"n": 0}, 400, "n"),
    ("n-negative", H, {"n": -1}, 400, "n"),
    ("n-too-many", C, {"n": 1000}, 400, "n"),
    ("logprobs-too-many", C, {"logprobs": 6}, 400, "logprobs"),
    ("top-logprobs-too-many", H, {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("too-many-stop-strings", C, {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("empty-messages", H, {"messages": []}, 400, "messages"),
    ("messages-not-a-list", H, {"messages": {"role": "user", "content": "Hi"}}, 400, "messages"),
    ("message-not-an-object", H, {"messages": ["Hi"]}, 400, None),
    ("unknown-role", H, {"messages": [{"role": "robot", "content": "Hi"}]}, 400, None),
    ("missing-role", H, {"messages": [{"content": "Hi"}]}, 400, None),
    ("content-number", H, {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("content-object", H, {"messages": [{"role": "user", "content": {"text": "Hi"}}]}, 400, None),
    (
        "content-image-part",
        H,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
    ),
    ("content-list-of-numbers", H, {"messages": [{"role": "user", "content": [5]}]}, 400, None),
]


@pytest.mark.parametrize(
    ("endpoint", "fields", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_FIELDS],
)
def test_bad_request_fields_get_openai_errors(http, model_name, endpoint, fields, status, param):
    response = http.post(f"/v1/{endpoint}", json=_body(endpoint, model_name, fields), timeout=30)
    error = openai_error(response, status)
    if param is not None:
        assert error["param"] == param, error


BAD_RAW = [
    ("invalid-json", b'{"model": "MODEL", "prompt": '),
    ("trailing-garbage", b'{"model": "MODEL", "prompt": "Hi"} x'),
    ("single-quotes", b"{'model': 'MODEL'}"),
    ("empty-body", b""),
    ("array-body", b'[{"model": "MODEL", "prompt": "Hi"}]'),
    ("string-body", b'"hello"'),
    ("number-body", b"3"),
    ("null-body", b"null"),
    ("true-body", b"true"),
    ("nan-temperature", b'{"model": "MODEL", "prompt": "Hi", "max_tokens": 2, "temperature": NaN}'),
    ("infinite-top-p", b'{"model": "MODEL", "prompt": "Hi", "max_tokens": 2, "top_p": Infinity}'),
    ("invalid-utf8", b'{"model": "MODEL", "prompt": "\xff\xfe", "max_tokens": 2}'),
    ("deeply-nested", b"[" * 1500 + b"]" * 1500),
]


@pytest.mark.parametrize("endpoint", [C, H])
@pytest.mark.parametrize("payload", [pytest.param(p, id=i) for i, p in BAD_RAW])
def test_malformed_bodies_get_400(http, model_name, endpoint, payload):
    response = http.post(
        f"/v1/{endpoint}",
        content=payload.replace(b"MODEL", model_name.encode()),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    openai_error(response, 400)


def test_invalid_json_says_so(http):
    response = http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    error = openai_error(response, 400)
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"


def test_body_over_the_configured_limit_gets_413(http, model_name):
    body = json.dumps({"model": model_name, "prompt": "x" * MAX_REQUEST_BYTES, "max_tokens": 1}).encode()
    assert len(body) > MAX_REQUEST_BYTES
    headers = {"content-type": "application/json"}
    error = openai_error(http.post("/v1/completions", content=body, headers=headers, timeout=30), 413)
    assert error["code"] == "request_too_large"
    # the same body without a Content-Length header (chunked): the limit holds while it is read
    chunked = http.post(
        "/v1/completions", content=iter([body[:1000], body[1000:]]), headers=headers, timeout=30
    )
    assert "content-length" not in chunked.request.headers
    openai_error(chunked, 413)
    # a body just under the limit is served (the padding is an unknown field, ignored)
    small = {"model": model_name, "prompt": "Hi", "max_tokens": 1, "user": ""}
    small["user"] = "x" * (MAX_REQUEST_BYTES - 10 - len(json.dumps(small)))
    padded = json.dumps(small).encode()
    assert MAX_REQUEST_BYTES - 20 < len(padded) <= MAX_REQUEST_BYTES
    assert http.post("/v1/completions", content=padded, headers=headers).status_code == 200


def test_huge_max_tokens_is_context_length_exceeded(client, model_name):
    prompt = [5] * (MAX_MODEL_LEN - 4)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt=prompt, max_tokens=2**64, temperature=0)
    assert caught.value.code == "context_length_exceeded"


def test_server_keeps_serving_after_bad_input(http, client, model_name):
    assert http.get("/health").status_code == 200
    out = client.completions.create(model=model_name, prompt=EOS_PROMPT, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3


# ---------------------------------------------------------------------------------------- last on "api"


def test_huge_top_k_is_not_a_server_error(http, model_name):
    """top_k above the vocabulary size means no top-k filter; whatever the answer, the engine survives.

    Runs last on "api": if the engine loop dies here, every later request on this replica fails.
    """
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 2, "temperature": 1.0, "top_k": 2**63}
    response = http.post("/v1/completions", json=body, timeout=30)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        openai_error(response, response.status_code)
    assert http.get("/health").status_code == 200
    again = http.post(
        "/v1/completions", json={"model": model_name, "prompt": "Hi", "max_tokens": 2}, timeout=30
    )
    assert again.status_code == 200, again.text
