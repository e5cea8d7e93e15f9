"""Property-based fuzz of the OpenAI API from its own OpenAPI schema: no input gets a 5xx.

Request bodies come from hypothesis strategies built from the app's /openapi.json (the request
models' JSON schemas), then from the same schema with any field replaced by an arbitrary JSON
value or left out, and from arbitrary JSON documents. Every answer must be below 500; an error
has the OpenAI shape, a success the OpenAI response shape, a stream ends with `data: [DONE]`.

Which of those bodies the engine accepts is up to the draw, so a second property covers the engine
path for certain: bodies with every sampling field drawn within its documented range must all
succeed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import served_app, small_app
from tests.toolkit import error_object

APP = "fuzz"
MAX_MODEL_LEN = 48  # bounds the work of any request the fuzz sends: at most 47 tokens per choice
VOCAB_SIZE = 2048  # the demo model's
FUZZ_SETTINGS = settings(
    max_examples=70,
    deadline=None,
    database=None,
    derandomize=True,  # the same inputs on every run: a failure here is reproducible
    # no shrinking: an input that breaks the engine makes every later one fail too, so a shrunk
    # example would point at an innocent request; the first failing input is the one to report
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
)


@pytest.fixture(scope="module")
def fuzz_url(serve_http, demo_model) -> Iterator[str]:
    options = small_app(demo_model, expert_shards=1, max_model_len=MAX_MODEL_LEN, max_num_seqs=16)
    with served_app(serve_http, APP, options) as url:
        yield url


@pytest.fixture(scope="module")
def http(fuzz_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_url, timeout=httpx.Timeout(60, connect=10)) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(http) -> dict:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def served_model(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


# ------------------------------------------------------------------------------ schema -> strategies

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(node: dict, openapi: dict) -> st.SearchStrategy:
    """Values valid for one JSON-schema node of the OpenAPI document (the subset FastAPI emits)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return from_schema(openapi["components"]["schemas"][name], openapi)
    if "anyOf" in node:
        return st.one_of([from_schema(option, openapi) for option in node["anyOf"]])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "string":
        return st.text(max_size=40)
    if kind == "integer":
        low, high = node.get("minimum"), node.get("maximum")
        if "exclusiveMinimum" in node:
            low = math.floor(node["exclusiveMinimum"]) + 1
        return st.integers(
            min_value=None if low is None else math.ceil(low),
            max_value=None if high is None else math.floor(high),
        )
    if kind == "number":
        return st.floats(
            min_value=node.get("minimum", node.get("exclusiveMinimum")),
            max_value=node.get("maximum"),
            exclude_min="exclusiveMinimum" in node,
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        least = node.get("minItems", 0)
        return st.lists(from_schema(node.get("items", {}), openapi), min_size=least, max_size=least + 4)
    if kind == "object":
        if "properties" in node:
            required = set(node.get("required", ()))
            props = {k: from_schema(v, openapi) for k, v in node["properties"].items()}
            return st.fixed_dictionaries(
                {k: v for k, v in props.items() if k in required},
                optional={k: v for k, v in props.items() if k not in required},
            )
        values = node.get("additionalProperties")
        values = from_schema(values, openapi) if isinstance(values, dict) else ANY_JSON
        return st.dictionaries(st.text(max_size=10), values, max_size=3)
    return ANY_JSON  # {}: any value


def request_schema(openapi: dict, path: str) -> dict:
    return openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def bodies(openapi: dict, path: str, served_model: str) -> st.SearchStrategy:
    """Schema-valid bodies, near-valid ones (any field of any type, or missing), and any JSON at all."""
    schema = request_schema(openapi, path)
    valid = from_schema(schema, openapi)
    # the served name most of the time, so that most bodies reach the engine
    model = st.one_of(st.just(served_model), st.just(served_model), st.text(max_size=12))
    valid = st.tuples(valid, model).map(lambda pair: {**pair[0], "model": pair[1]})

    resolved = openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    fields = {
        name: st.one_of(from_schema(node, openapi), ANY_JSON)
        for name, node in resolved["properties"].items()
        if name != "model"
    }
    fields["model"] = st.one_of(model, ANY_JSON)
    near_valid = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(valid, valid, near_valid, near_valid, ANY_JSON)


def accepted_bodies(path: str, served_model: str) -> st.SearchStrategy:
    """Bodies the engine must serve: every field within its range, prompts short enough that the
    prompt plus max_tokens fits MAX_MODEL_LEN (six characters are at most ~25 byte-level tokens)."""
    sampling = {
        "max_tokens": st.integers(1, 8),
        "temperature": st.floats(0.0, 2.0),
        "top_p": st.floats(0.0, 1.0, exclude_min=True),
        "top_k": st.integers(0, 50),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3)),
        "n": st.integers(1, 3),
        "presence_penalty": st.floats(-2.0, 2.0),
        "frequency_penalty": st.floats(-2.0, 2.0),
        "repetition_penalty": st.floats(0.0, 2.0, exclude_min=True),
        "logit_bias": st.dictionaries(
            st.integers(0, VOCAB_SIZE - 1).map(str), st.floats(-100.0, 100.0), max_size=3
        ),
        "stop_token_ids": st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=3),
        "ignore_eos": st.booleans(),
        "user": st.text(max_size=8),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    }
    required: dict[str, st.SearchStrategy] = {"model": st.just(served_model), "unit": st.floats(0.0, 1.0)}
    if path == "/v1/completions":
        text = st.text(min_size=1, max_size=6)
        ids = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=16)
        required["prompt"] = st.one_of(text, ids, st.lists(text, min_size=1, max_size=3))
        sampling["logprobs"] = st.integers(0, 5)
        sampling["echo"] = st.booleans()
    else:
        words = st.text(alphabet="abcdefgh ", max_size=6)
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": words}
        )
        required["messages"] = st.lists(message, min_size=1, max_size=2)
        sampling["logprobs"] = st.booleans()
    body = st.fixed_dictionaries(required, optional=sampling)
    return st.tuples(body, st.booleans(), st.booleans(), st.integers(0, 5)).map(lambda drawn: _finish(*drawn))


def _finish(body: dict, stream: bool, include_usage: bool, top_logprobs: int) -> dict:
    """The fields that depend on each other: min_tokens within max_tokens, stream_options only on a
    stream, top_logprobs only with logprobs."""
    body = dict(body)
    body["min_tokens"] = int(body.pop("unit") * body.get("max_tokens", 8))
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": include_usage}
    if body.get("logprobs") is True:
        body["top_logprobs"] = top_logprobs
    return body


# ------------------------------------------------------------------------------------------ checks


def check_error(response: httpx.Response, text: str) -> None:
    error_object(json.loads(text))


def check_choices(choices: list[dict], n: int, chat: bool) -> None:
    assert sorted(c["index"] for c in choices) == list(range(n))
    for choice in choices:
        assert choice["finish_reason"] in ("stop", "length")
        text = choice["message"]["content"] if chat else choice["text"]
        assert isinstance(text, str)
        if chat:
            assert choice["message"]["role"] == "assistant"


def check_stream(text: str, n: int, chat: bool) -> None:
    events = [line[len("data: ") :] for line in text.splitlines() if line]
    assert all(line.startswith("data: ") for line in text.splitlines() if line), text[:500]
    assert events and events[-1] == "[DONE]", text[-500:]
    finished: dict[int, str] = {}
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, f"an error after the response started: {event}"
        assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion")
        for choice in chunk["choices"]:
            if choice["finish_reason"]:
                finished[choice["index"]] = choice["finish_reason"]
    assert sorted(finished) == list(range(n)), "every choice of a stream ends with a finish_reason"


def choices_wanted(body: dict, chat: bool) -> int:
    """n per prompt: /v1/completions also takes a list of prompts (texts, or token-id lists)."""
    prompt = body.get("prompt")
    if chat or not isinstance(prompt, list) or not prompt or isinstance(prompt[0], int):
        return body.get("n", 1)
    return body.get("n", 1) * len(prompt)


def send(http: httpx.Client, path: str, body: Any) -> int:
    chat = path.endswith("chat/completions")
    with http.stream("POST", path, json=body) as response:
        text = response.read().decode()
    assert response.status_code < 500, f"{response.status_code} for {json.dumps(body)[:2000]}: {text[:1000]}"
    if response.status_code >= 400:
        check_error(response, text)
        return response.status_code
    assert response.status_code == 200, text
    n = choices_wanted(body, chat)
    if body.get("stream") is True:
        assert response.headers["content-type"].startswith("text/event-stream")
        check_stream(text, n, chat)
        return 200
    result = json.loads(text)
    check_choices(result["choices"], n, chat)
    usage = result["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] >= n
    return 200


# ------------------------------------------------------------------------------------------- tests


def test_openapi_describes_both_endpoints(openapi):
    for path, model in [
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
    ]:
        assert request_schema(openapi, path) == {"$ref": f"#/components/schemas/{model}"}
    assert {"model", "prompt"} <= set(openapi["components"]["schemas"]["CompletionRequest"]["required"])
    assert {"model", "messages"} <= set(openapi["components"]["schemas"]["ChatCompletionRequest"]["required"])


def _base(path: str, served: str) -> dict:
    if path == "/v1/completions":
        return {"model": served, "prompt": "Hi", "max_tokens": 2}
    return {"model": served, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


PATHS = ["/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("path", PATHS)
def test_fuzz_never_gets_a_server_error(http, openapi, served_model, path):
    statuses: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(bodies(openapi, path, served_model))
    def check(body):
        statuses[send(http, path, body)] += 1

    check()
    # and the server still serves
    assert http.get("/health").status_code == 200
    after = http.post(path, json={**_base(path, served_model), "temperature": 0})
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("path", PATHS)
def test_bodies_within_every_range_are_served(http, served_model, path):
    @settings(FUZZ_SETTINGS, max_examples=30)
    @given(accepted_bodies(path, served_model))
    def check(body):
        assert send(http, path, body) == 200, json.dumps(body)

    check()


EDGES = [
    {"top_k": 2**64, "temperature": 1.0},
    {"top_k": 2**31, "temperature": 1.0, "n": 2},
    {"seed": -(2**70), "temperature": 0.5, "n": 2},
    {"seed": 2**70, "temperature": 2.0, "top_p": 1e-300},
    {"max_tokens": 2**64, "n": 3, "stream": True, "stream_options": {"include_usage": True}},
    {"stop": ["", "\x00", "a" * 500], "n": 2},
    {"temperature": 5e-324, "top_p": 5e-324, "top_k": 1},
    # several choices of a request the engine refuses (the other endpoint ignores the foreign field)
    {"n": 16, "prompt": [10**6]},
    {"n": 16, "messages": [{"role": "user", "content": "word " * 60}]},
]


@pytest.mark.parametrize("path", PATHS)
def test_schema_edge_values_never_get_a_server_error(http, served_model, path):
    """Values at the edges of the schema's ranges (unbounded integers above all) on requests that reach
    the engine; after each one the engine must still be up."""
    for edge in EDGES:
        send(http, path, {**_base(path, served_model), **edge})
        assert http.get("/health").status_code == 200, f"the engine is down after {edge}"
