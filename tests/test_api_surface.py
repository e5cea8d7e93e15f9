"""The OpenAI surface clients rely on, through real HTTP with the openai client, streaming and not:
completion prompt lists, echo, logprobs offsets, GET /v1/models/{id}, no empty chunks, context limits."""

from __future__ import annotations

import openai
import pytest

from tests.api_helpers import api_app, refused, stream_texts

MAX_MODEL_LEN = 128
PROMPTS = ["A computer program", "The harbour", "Once"]
CHAT = [{"role": "user", "content": "Tell me a story"}]

api_url = api_app("surface", max_model_len=MAX_MODEL_LEN)


def _greedy(client, model_name, prompt, **fields) -> openai.types.Completion:
    return client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0, **fields)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("kind", ["text", "token-ids"])
def test_a_list_of_prompts_gives_one_choice_per_prompt_and_n(client, model_name, stream, kind):
    prompts = PROMPTS if kind == "text" else [[5, 6, 7], [40, 41], [9]]
    alone = [_greedy(client, model_name, p) for p in prompts]
    request = dict(model=model_name, prompt=prompts, max_tokens=8, temperature=0, n=2)
    if stream:
        texts, finish, chunks = stream_texts(
            client, chat=False, stream_options={"include_usage": True}, **request
        )
        usage = chunks[-1].usage
    else:
        out = client.completions.create(**request)
        texts = {c.index: c.text for c in out.choices}
        finish = {c.index: c.finish_reason for c in out.choices}
        usage = out.usage
    assert sorted(texts) == list(range(2 * len(prompts)))
    for p, single in enumerate(alone):
        for j in range(2):
            assert texts[2 * p + j] == single.choices[0].text
            assert finish[2 * p + j] == single.choices[0].finish_reason
    assert usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_echo_puts_the_prompt_before_the_text(client, model_name, stream):
    plain = _greedy(client, model_name, PROMPTS[0]).choices[0].text
    request = dict(model=model_name, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    if stream:
        texts, _, _ = stream_texts(client, chat=False, **request)
        text = texts[0]
    else:
        text = client.completions.create(**request).choices[0].text
    assert text == PROMPTS[0] + plain


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("echo", [False, True])
def test_logprobs_have_text_offsets_and_include_the_sampled_token(client, model_name, stream, echo):
    request = dict(model=model_name, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=3, logprobs=2)
    request |= {"echo": echo, "extra_body": {"ignore_eos": True}}
    if stream:
        chunks = list(client.completions.create(stream=True, **request))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens]
        offsets = [o for p in parts for o in p.text_offset]
        tops = [t for p in parts for t in p.top_logprobs]
    else:
        choice = client.completions.create(**request).choices[0]
        text, lp = choice.text, choice.logprobs
        tokens, offsets, tops = lp.tokens, lp.text_offset, lp.top_logprobs
    assert len(tokens) == len(offsets) == len(tops) == 10
    start = len(PROMPTS[0]) if echo else 0
    assert offsets[0] == start and offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, top in zip(tokens, tops, strict=True):
        assert token in top and len(top) <= 3  # distinct ids can decode alike (partial UTF-8)


def test_a_model_can_be_retrieved_by_id(client, model_name):
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_no_stream_chunk_is_empty(client, model_name, endpoint):
    """The demo model writes many partial UTF-8 characters (tokens with no text of their own yet)."""
    request = dict(model=model_name, max_tokens=60, temperature=1.0, seed=5, n=3)
    chat = endpoint == "chat/completions"
    request |= {"messages": CHAT} if chat else {"prompt": PROMPTS[0]}
    texts, finish, chunks = stream_texts(client, chat=chat, **request)
    assert sorted(finish) == [0, 1, 2] and all(texts.values())
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                continue
            if chat:
                assert choice.delta.role == "assistant" or choice.delta.content, chunk
            else:
                assert choice.text, chunk


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("what", ["max_tokens", "prompt"])
def test_beyond_the_context_is_context_length_exceeded(client, model_name, endpoint, stream, what):
    body: dict = {"model": model_name, "max_tokens": 8}
    long = "word " * (MAX_MODEL_LEN + 20)
    if endpoint == "completions":
        body["prompt"] = long if what == "prompt" else PROMPTS[0]
    else:
        body["messages"] = [{"role": "user", "content": long if what == "prompt" else "Hi"}]
    if what == "max_tokens":
        body["max_tokens"] = MAX_MODEL_LEN
    error = refused(client, endpoint, body, stream)
    assert error["code"] == "context_length_exceeded", error
    if what == "max_tokens":
        assert error["param"] == "max_tokens"


def test_max_tokens_that_fits_is_served_through_the_client(client, model_name):
    prompt = [5] * (MAX_MODEL_LEN - 4)
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0)
    assert 1 <= out.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model_name, prompt=prompt, max_tokens=5, temperature=0)
    assert caught.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        ("completions", {"prompt": ["a"] * 33}, "prompt"),
        ("completions", {"prompt": [["a"]]}, "prompt"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "Hi", "audio": {}}]},
            "messages.0.audio",
        ),
        ("chat/completions", {"modalities": ["audio"]}, "modalities"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_surface_bad_input_is_400(client, model_name, endpoint, fields, param, stream):
    body = {"model": model_name, "max_tokens": 2}
    body |= {"prompt": "Hi"} if endpoint == "completions" else {"messages": CHAT}
    error = refused(client, endpoint, body | fields, stream)
    assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_stream_options_without_stream_is_400(client, model_name, endpoint):
    chat = endpoint == "chat/completions"
    body = {"model": model_name, "max_tokens": 2, "stream_options": {"include_usage": True}}
    body |= {"messages": CHAT} if chat else {"prompt": "Hi"}
    error = refused(client, endpoint, body, stream=False)
    assert error["param"] == "stream_options", error
    _, _, chunks = stream_texts(client, chat=chat, **body)
    assert chunks[-1].usage.completion_tokens >= 1
