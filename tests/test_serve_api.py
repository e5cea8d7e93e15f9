"""The OpenAI-compatible API of a real Serve app on loopback, driven by the real `openai` client.

Two apps share the session's Serve proxy: "api" (two expert shards: the whole API surface, bad
input, the request-size limit) and "guarded" (API keys from a key file; one sequence slot and one
waiting slot: waiting, 429, disconnects, health). Both are deleted when the module ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import string
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import ray
from ray import serve

from cluster.engine import Engine
from cluster.options.serve import ServeOptions
from router.tokenizer import Tokenizer
from tests.conftest import deploy_app

MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 4096
LONG_PROMPT = "A computer program"  # its greedy continuation runs past 200 tokens without an end token
EOS_PROMPT = "The harbour"  # its greedy continuation ends with an end token well before 200 tokens


def openai_error(response: httpx.Response, status: int) -> dict:
    """Asserts an OpenAI-style error response with this status; returns its "error" object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-event stream, in order; asserts the framing."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        events.append(line[len("data: ") :])
    return events


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def engine_load(app_name: str) -> float:
    handle = serve.get_deployment_handle("MoEEngine", app_name=app_name)
    return handle.record_autoscaling_stats.remote().result(timeout_s=30)["ongoing_sequences"]


@contextlib.contextmanager
def served_app(base_url: str, name: str, options: dict) -> Iterator[str]:
    """The real app deployed at /<name> for the duration; yields its URL."""
    deploy_app(name, options)
    try:
        yield f"{base_url}/{name}"
    finally:
        serve.delete(name)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def api_url(serve_http, demo_model) -> Iterator[str]:
    options = {
        "model": str(demo_model),
        "expert_shards": 2,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": 32,
        "max_request_bytes": MAX_REQUEST_BYTES,
    }
    with served_app(serve_http, "api", options) as url:
        yield url


@pytest.fixture(scope="module")
def http(api_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def engine(ray_cluster, demo_model) -> Iterator[Engine]:
    """The same model outside Serve, in the session's cluster: the reference for HTTP results."""
    with Engine(
        demo_model, expert_shards=2, router_cpus=0.5, expert_cpus=0.5, max_model_len=MAX_MODEL_LEN
    ) as eng:
        yield eng


@pytest.fixture(scope="module")
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_model_dir(demo_model)


# ------------------------------------------------------------------------------------- models and health


def test_models_lists_the_served_model(http, demo_model):
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == ServeOptions(model=str(demo_model)).model_name() == demo_model.name
    assert card["object"] == "model"


def test_health_is_ok_while_engine_and_experts_are_up(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


# ------------------------------------------------------------------------------ greedy text == Engine


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "finish_reason"),
    [(EOS_PROMPT, 100, "stop"), (LONG_PROMPT, 30, "length"), ([5, 6, 7, 8], 30, "length")],
    ids=["eos", "long", "ids"],
)
def test_completion_greedy_text_equals_engine(
    client, model_name, engine, tokenizer, prompt, max_tokens, finish_reason
):
    [expected] = engine.generate(prompt, max_new_tokens=max_tokens, temperature=0.0)
    assert expected.finish_reason == finish_reason, "precondition: the prompt's greedy text is as chosen"
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=max_tokens, temperature=0)
    [choice] = out.choices
    assert choice.text == expected.text
    assert choice.finish_reason == finish_reason
    assert choice.index == 0 and choice.logprobs is None
    prompt_tokens = len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == prompt_tokens + len(expected.token_ids)
    assert out.object == "text_completion" and out.model == model_name and out.id


def test_max_tokens_cuts_with_finish_reason_length(client, model_name):
    cut = client.completions.create(model=model_name, prompt=EOS_PROMPT, max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 5


CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_chat_greedy_text_equals_engine(client, model_name, engine, tokenizer):
    prompt_ids = tokenizer.apply_chat_template(CHAT)
    [expected] = engine.generate(prompt_ids, max_new_tokens=40, temperature=0.0)
    out = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=40, temperature=0)
    [choice] = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.object == "chat.completion" and out.model == model_name

    # content given as text parts is the same conversation; max_completion_tokens wins over max_tokens
    parts = [
        CHAT[0],
        {
            "role": "user",
            "content": [{"type": "text", "text": t} for t in ("What is the ", "capital of France?")],
        },
    ]
    again = client.chat.completions.create(
        model=model_name, messages=parts, max_tokens=2, max_completion_tokens=40, temperature=0
    )
    assert again.choices[0].message.content == expected.text


# ------------------------------------------------------------------------------ streaming == non-streaming


def _stream_completion(client, **request) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, **request):
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, usage


def _stream_chat(client, **request) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(stream=True, **request):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.index not in texts:
                assert choice.delta.role == "assistant", "a choice's first delta names the role"
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, usage


@pytest.mark.parametrize(
    ("prompt", "max_tokens"), [(EOS_PROMPT, 100), (LONG_PROMPT, 40)], ids=["stop", "length"]
)
def test_streamed_completion_equals_non_streamed(client, model_name, prompt, max_tokens):
    request = dict(model=model_name, prompt=prompt, max_tokens=max_tokens, temperature=0)
    whole = client.completions.create(**request)
    texts, finish, usage = _stream_completion(client, stream_options={"include_usage": True}, **request)
    assert texts == {0: whole.choices[0].text}
    assert finish == {0: whole.choices[0].finish_reason}
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_streamed_chat_equals_non_streamed(client, model_name):
    request = dict(model=model_name, messages=CHAT, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**request)
    texts, finish, usage = _stream_chat(client, stream_options={"include_usage": True}, **request)
    assert texts == {0: whole.choices[0].message.content}
    assert finish == {0: whole.choices[0].finish_reason}
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_raw_stream_is_sse_ending_with_done(http, model_name, endpoint):
    body = {"model": model_name, "max_tokens": 6, "temperature": 0, "stream": True}
    body |= {"prompt": LONG_PROMPT} if endpoint == "completions" else {"messages": CHAT}
    with http.stream("POST", f"/v1/{endpoint}", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("error" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # no usage chunk unless asked for
    assert all("usage" not in c for c in chunks)


# ---------------------------------------------------------------------------------------------- stop


def _ascii_window(text: str, start: int, width: int = 3) -> str:
    allowed = set(string.ascii_letters + " ")
    for i in range(start, len(text) - width + 1):
        window = text[i : i + width]
        if set(window) <= allowed and text.find(window) == i:
            return window
    raise AssertionError(f"precondition: no plain {width}-character window in {text!r} after {start}")


def test_stop_strings_cut_the_text(client, model_name):
    request = dict(model=model_name, prompt=LONG_PROMPT, max_tokens=60, temperature=0)
    full = client.completions.create(**request).choices[0].text
    early = _ascii_window(full, 2)
    late = _ascii_window(full, full.find(early) + 6)

    one = client.completions.create(stop=early, **request)
    assert one.choices[0].text == full[: full.find(early)]
    assert one.choices[0].finish_reason == "stop"
    assert one.usage.completion_tokens < 60

    # a list: the earliest match wins, whatever its place in the list; strings that never match are harmless
    several = client.completions.create(stop=["\x00never", late, early], **request)
    assert several.choices[0].text == full[: full.find(early)]
    assert several.choices[0].finish_reason == "stop"
    only_late = client.completions.create(stop=[late], **request)
    assert only_late.choices[0].text == full[: full.find(late)]

    # streaming: never a byte of the stop string or beyond, and the same text in the end
    texts, finish, _ = _stream_completion(client, stop=[late, early], **request)
    assert texts == {0: full[: full.find(early)]}
    assert finish == {0: "stop"}


def test_chat_stop_string(client, model_name):
    request = dict(model=model_name, messages=CHAT, max_tokens=60, temperature=0)
    full = client.chat.completions.create(**request).choices[0].message.content
    stop = _ascii_window(full, 2)
    out = client.chat.completions.create(stop=stop, **request)
    assert out.choices[0].message.content == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    texts, finish, _ = _stream_chat(client, stop=stop, **request)
    assert texts == {0: full[: full.find(stop)]} and finish == {0: "stop"}


# -------------------------------------------------------------------------------- n, seed, top_k, logprobs


def test_n_choices(client, model_name):
    greedy = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=12, temperature=0)
    three = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=12, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.text for c in three.choices} == {greedy.choices[0].text}
    assert three.usage.completion_tokens == 3 * greedy.usage.completion_tokens
    assert three.usage.prompt_tokens == greedy.usage.prompt_tokens

    sampled = dict(model=model_name, prompt=LONG_PROMPT, max_tokens=12, temperature=1.0, seed=7, n=3)
    first = client.completions.create(**sampled)
    second = client.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1, "each choice draws its own sample"

    texts, finish, usage = _stream_completion(client, stream_options={"include_usage": True}, **sampled)
    assert texts == {c.index: c.text for c in first.choices}
    assert finish == {c.index: c.finish_reason for c in first.choices}
    assert usage.completion_tokens == first.usage.completion_tokens

    chat = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=8, temperature=1.0, seed=3, n=2
    )
    texts, finish, _ = _stream_chat(
        client, model=model_name, messages=CHAT, max_tokens=8, temperature=1.0, seed=3, n=2
    )
    assert texts == {c.index: c.message.content for c in chat.choices}
    assert finish == {c.index: c.finish_reason for c in chat.choices}


def test_seed_makes_sampling_reproducible_and_top_k_1_is_greedy(client, model_name):
    def draw(seed: int, **extra) -> str:
        out = client.completions.create(
            model=model_name, prompt=LONG_PROMPT, max_tokens=10, temperature=1.0, seed=seed, **extra
        )
        return out.choices[0].text

    assert draw(11) == draw(11)
    assert any(draw(s) != draw(11) for s in (12, 13, 14))
    greedy = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=10, temperature=0)
    assert draw(5, extra_body={"top_k": 1}) == greedy.choices[0].text
    assert draw(6, top_p=1e-6) == greedy.choices[0].text

    chat_greedy = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=10, temperature=0
    )
    chat_top1 = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=10, temperature=1.5, seed=1, extra_body={"top_k": 1}
    )
    assert chat_top1.choices[0].message.content == chat_greedy.choices[0].message.content


def test_completion_logprobs(client, model_name):
    out = client.completions.create(
        model=model_name, prompt=LONG_PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 8
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert chosen <= 0.0
        assert 1 <= len(top) <= 3  # keyed by text: two tokens that decode alike share an entry
        assert all(v <= 0.0 for v in top.values())
        # greedy picks the most likely token (an entry shared by two tokens may show the other one's value)
        assert chosen >= max(top.values()) - 1e-5
    plain = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].text == out.choices[0].text

    zero = client.completions.create(
        model=model_name, prompt=LONG_PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    assert zero.choices[0].logprobs.top_logprobs == [{}] * 4
    assert zero.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[:4])

    texts, _, _ = _stream_completion(client, model=model_name, prompt=LONG_PROMPT, max_tokens=8, logprobs=2)
    assert len(texts) == 1


def test_chat_logprobs(client, model_name):
    out = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0.0
        assert isinstance(entry.bytes, list)
        if "\ufffd" not in entry.token:
            assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
    just_chosen = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=6, temperature=0, logprobs=True
    )
    assert [e.top_logprobs for e in just_chosen.choices[0].logprobs.content] == [[]] * 6
    plain = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None


# ---------------------------------------------------------------------------------------- concurrency

CONCURRENT = 32
CONCURRENT_TOKENS = 10


def _concurrent_prompts() -> list[str]:
    words = "the harbour town woke slowly, fishing boats came back before sunrise and the market opened"
    return [f"{words[: 6 + 3 * i]} {i}" for i in range(CONCURRENT)]


def test_32_concurrent_streams_each_equal_their_greedy_result_alone(engine, api_url, model_name):
    prompts = _concurrent_prompts()
    alone = [engine.generate(p, max_new_tokens=CONCURRENT_TOKENS)[0] for p in prompts]

    peak = 0.0
    stop_sampling = threading.Event()

    def sample_load() -> None:
        nonlocal peak
        while not stop_sampling.is_set():
            peak = max(peak, engine_load("api"))
            time.sleep(0.05)

    async def stream_all() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as aclient:

            async def one(prompt: str) -> tuple[str, str | None]:
                text, finish = "", None
                stream = await aclient.completions.create(
                    model=model_name, prompt=prompt, max_tokens=CONCURRENT_TOKENS, temperature=0, stream=True
                )
                async for chunk in stream:
                    for choice in chunk.choices:
                        text += choice.text
                        finish = choice.finish_reason or finish
                return text, finish

            return await asyncio.gather(*(one(p) for p in prompts))

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    try:
        together = asyncio.run(stream_all())
    finally:
        stop_sampling.set()
        sampler.join()
    assert together == [(c.text, c.finish_reason) for c in alone]
    # they really ran together: the engine batched far more than a handful of them at once
    assert peak >= CONCURRENT // 2, f"at most {peak} sequences ran at once"


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
    ("wrong-type-prompt-strings", C, {"prompt": ["a", "b"]}, 400, None),
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


# ------------------------------------------------------------------- the "guarded" app: keys and limits

KEYS = ("sk-test-one", "sk-test-two")
AUTH = {"authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def guarded_url(serve_http, demo_model, tmp_path_factory) -> Iterator[str]:
    """API keys from a key file; one sequence slot (and KV cache for one sequence), one waiting slot."""
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"{KEYS[0]}\n\n  {KEYS[1]}  \n")
    options = {
        "model": str(demo_model),
        "expert_shards": 1,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": 128,
        "max_num_seqs": 1,
        "max_waiting": 1,
        "api_key_file": str(key_file),
    }
    with served_app(serve_http, "guarded", options) as url:
        yield url


@pytest.fixture
def guarded(guarded_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded_url, headers=AUTH, timeout=60) as client:
        yield client


AUTH_REQUESTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "model", "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "model", "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/completions", {"not": "even valid"}),
]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer sk-wrong",
        f"Basic {KEYS[0]}",
        KEYS[0],
        f"Bearer {KEYS[0]}x",
        f"Bearer {KEYS[0][:-1]}",
    ],
    ids=["none", "empty-bearer", "wrong-key", "basic-scheme", "no-scheme", "longer-key", "shorter-key"],
)
def test_v1_without_a_valid_key_gets_401(guarded_url, authorization):
    headers = {"authorization": authorization} if authorization is not None else {}
    with httpx.Client(base_url=guarded_url, timeout=30) as http:
        for method, path, body in AUTH_REQUESTS:
            error = openai_error(http.request(method, path, json=body, headers=headers), 401)
            assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", KEYS)
def test_either_configured_key_is_accepted(guarded_url, key):
    client = openai.OpenAI(base_url=f"{guarded_url}/v1", api_key=key, max_retries=0, timeout=60)
    [card] = client.models.list().data
    out = client.completions.create(model=card.id, prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    chat = client.chat.completions.create(
        model=card.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert chat.usage.completion_tokens == 2


def test_health_needs_no_key(guarded_url):
    response = httpx.get(f"{guarded_url}/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_api_keys_come_from_the_environment_and_the_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n\n")
    monkeypatch.setenv("MOE_CLUSTER_API_KEYS", " env-a, ,env-b ")
    assert ServeOptions(api_key_file=str(key_file)).api_keys() == {"env-a", "env-b", "file-key"}
    monkeypatch.delenv("MOE_CLUSTER_API_KEYS")
    assert ServeOptions().api_keys() == set()


GUARDED_TOKENS = 80  # LONG_PROMPT runs to this length: long enough to hold the slot a few seconds


def _long_request(model: str, stream: bool = True, max_tokens: int = GUARDED_TOKENS) -> dict:
    return {
        "model": model,
        "prompt": LONG_PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _first_token(lines: Iterator[str]) -> dict:
    """Reads SSE lines until the first token chunk: the request is then running.

    Keep `lines` referenced afterwards: dropping the iterator closes the connection.
    """
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended before its first token")


def _rest(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_full_waiting_queue_gets_429_and_accepted_requests_complete(guarded, model_name):
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)
    with guarded.stream("POST", "/v1/completions", json=_long_request(model_name)) as running:
        assert running.status_code == 200
        running_lines = running.iter_lines()
        first = _first_token(running_lines)
        # the only sequence slot (and the whole KV cache) is taken: the next request is accepted and waits
        with guarded.stream("POST", "/v1/completions", json=_long_request(model_name)) as waiting:
            assert waiting.status_code == 200
            assert wait_for(lambda: engine_load("guarded") == 2, timeout=10)
            # the waiting queue is full: refused at once, streaming or not, either endpoint
            chat = {"model": model_name, "messages": CHAT, "max_tokens": 4}
            for path, body in [
                ("/v1/completions", _long_request(model_name, stream=False)),
                ("/v1/completions", _long_request(model_name, stream=True)),
                ("/v1/chat/completions", chat),
            ]:
                started = time.monotonic()
                refused = guarded.post(path, json=body, timeout=30)
                error = openai_error(refused, 429)
                assert time.monotonic() - started < 10
                assert int(refused.headers["retry-after"]) >= 1
                assert error["type"] == "rate_limit_error"
            assert engine_load("guarded") == 2
            waiting_events = _rest(waiting.iter_lines())
        running_events = [json.dumps(first), *_rest(running_lines)]

    texts = []
    for events in (running_events, waiting_events):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        texts.append("".join(c["choices"][0]["text"] for c in chunks))
    assert texts[0] == texts[1], "the request that waited got the same greedy text"
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)


def test_disconnected_clients_free_their_sequences(guarded, model_name):
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)
    request = _long_request(model_name, max_tokens=120)
    running = guarded.send(guarded.build_request("POST", "/v1/completions", json=request), stream=True)
    running_lines = running.iter_lines()
    _first_token(running_lines)
    waiting = guarded.send(guarded.build_request("POST", "/v1/completions", json=request), stream=True)
    assert waiting.status_code == 200
    assert wait_for(lambda: engine_load("guarded") == 2, timeout=10), engine_load("guarded")

    waiting.close()  # a waiting request leaves: its place in the queue is free at once
    assert wait_for(lambda: engine_load("guarded") == 1, timeout=8), engine_load("guarded")
    running.close()  # and the running one, well before its last token: its slot and KV blocks are free
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=8), engine_load("guarded")
    del running_lines

    # the freed slot and cache serve the next request at once
    started = time.monotonic()
    out = guarded.post("/v1/completions", json=_long_request(model_name, stream=False, max_tokens=3))
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - started < 10


def _expert_pids_of(app_name: str) -> list[int]:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    [replica] = list_actors(
        address=address,
        filters=[("class_name", "=", f"ServeReplica:{app_name}:MoEEngine"), ("state", "=", "ALIVE")],
        detail=True,
    )
    experts = list_actors(
        address=address, filters=[("class_name", "=", "ExpertActor"), ("state", "=", "ALIVE")], detail=True
    )
    pids = [a.pid for a in experts if a.placement_group_id == replica.placement_group_id]
    assert pids, "the replica's expert actors were not found in its placement group"
    return pids


def test_health_is_503_once_an_expert_actor_is_gone(guarded_url):
    """Last test on "guarded": it loses an expert actor (Serve then replaces the replica)."""
    with httpx.Client(base_url=guarded_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        os.kill(_expert_pids_of("guarded")[0], signal.SIGKILL)
        assert wait_for(lambda: http.get("/health").status_code == 503, timeout=20)
        response = http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"


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
