"""The OpenAI-compatible API of a real Serve app on loopback, driven by the real `openai` client.

The "api" app (tests/serve_api_app.py): models and health, greedy text equal to the Engine's, streaming
equal to non-streaming, stop strings, n, seed, top_k, logprobs, concurrent streams.
"""

from __future__ import annotations

import asyncio
import json
import string
import threading

import openai
import pytest

from cluster.options.serve import ServeOptions
from tests.serve_api_app import (
    CHAT,
    EOS_PROMPT,
    LONG_PROMPT,
    engine_load,
)
from tests.toolkit import sse_events

# ------------------------------------------------------------------------------------- models and health


def test_models_lists_the_served_model(http, api_model):
    response = http.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == ServeOptions(model=str(api_model)).model_name() == api_model.name
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
        # the 3 most likely and the sampled token; keyed by text: two tokens that decode alike share one
        assert 1 <= len(top) <= 4
        assert all(v <= 0.0 for v in top.values())
        # greedy picks the most likely token (an entry shared by two tokens may show the other one's value)
        assert chosen >= max(top.values()) - 1e-5
    plain = client.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].text == out.choices[0].text

    zero = client.completions.create(
        model=model_name, prompt=LONG_PROMPT, max_tokens=4, temperature=0, logprobs=0
    )
    zero_lp = zero.choices[0].logprobs
    pairs = zip(zero_lp.tokens, zero_lp.token_logprobs, strict=True)
    assert zero_lp.top_logprobs == [{token: lp} for token, lp in pairs]  # just the sampled token
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
        while not stop_sampling.wait(0.05):  # a sample every 50 ms until the streams are done
            peak = max(peak, engine_load("api"))

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
