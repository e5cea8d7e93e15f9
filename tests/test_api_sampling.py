"""The sampling fields clients send, through real HTTP with the openai client, against transformers.

The reference is transformers' own generate() on the same checkpoint with its logits processors
(repetition penalty, sequence bias, min new tokens) and, for OpenAI's frequency/presence penalties that
transformers lacks, a processor written from OpenAI's formula.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.api_helpers import api_app, refused, stream_texts
from tests.serve_api_app import EOS_PROMPT

PROMPT = "A computer program"  # greedy runs long without an end token


api_url = api_app("sampling", "api_model")


@pytest.fixture(scope="module")
def hf_model(api_model):
    return transformers.AutoModelForCausalLM.from_pretrained(api_model, dtype=torch.float32).eval()


class OpenAIPenalties(transformers.LogitsProcessor):
    """logit -= frequency * count + presence * (count > 0), over the generated tokens only."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len :]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _hf_text(hf_model, tokenizer, prompt: str, max_tokens: int, frequency=0.0, presence=0.0, **kwargs) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    processors = transformers.LogitsProcessorList([OpenAIPenalties(ids.shape[1], frequency, presence)])
    with torch.no_grad():
        out = hf_model.generate(
            ids, do_sample=False, max_new_tokens=max_tokens, logits_processor=processors, **kwargs
        )
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


CASES = {  # the openai client's own arguments; extensions go in extra_body
    "repetition": (dict(extra_body={"repetition_penalty": 1.8}), dict(repetition_penalty=1.8)),
    "frequency-presence": (
        dict(frequency_penalty=1.5, presence_penalty=0.8),
        dict(frequency=1.5, presence=0.8),
    ),
    "logit-bias": (
        dict(logit_bias={"300": 6.0, "17": -100}),
        dict(sequence_bias={(300,): 6.0, (17,): -100.0}),
    ),
    "min-tokens": (dict(extra_body={"min_tokens": 85}), dict(min_new_tokens=85)),  # its end comes at 11
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_text_with_each_field_equals_transformers(
    client, model_name, hf_model, tokenizer, case, stream
):
    ours, theirs = CASES[case]
    prompt = EOS_PROMPT if case == "min-tokens" else PROMPT
    expected = _hf_text(hf_model, tokenizer, prompt, 100, **theirs)
    plain = _hf_text(hf_model, tokenizer, prompt, 100)
    assert expected != plain, "the field must change the reference output, or the test proves nothing"
    request = dict(model=model_name, prompt=prompt, max_tokens=100, temperature=0, **ours)
    if stream:
        texts, _, _ = stream_texts(client, chat=False, **request)
        assert texts[0] == expected
    else:
        assert client.completions.create(**request).choices[0].text == expected


def test_ignore_eos_runs_to_max_tokens(client, model_name):
    natural = client.completions.create(model=model_name, prompt=EOS_PROMPT, max_tokens=100, temperature=0)
    assert natural.choices[0].finish_reason == "stop"
    n = natural.usage.completion_tokens + 5
    out = client.completions.create(
        model=model_name, prompt=EOS_PROMPT, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == n and out.choices[0].finish_reason == "length"


def test_stop_token_ids_end_the_choice(client, model_name):
    forced = {"logit_bias": {"300": 100}, "max_tokens": 10, "temperature": 0}
    out = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Hi"}],
        extra_body={"stop_token_ids": [300]},
        **forced,
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1


def test_seed_with_n_gives_different_reproducible_choices(client, model_name):
    request = dict(model=model_name, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11, n=3, user="u-1")
    first = [c.text for c in client.completions.create(**request).choices]
    again = [c.text for c in client.completions.create(**request).choices]
    assert first == again and len(set(first)) == 3
    texts, _, _ = stream_texts(client, chat=False, **request)
    assert [texts[i] for i in range(3)] == first


def test_include_usage_reports_the_tokens_of_every_choice(client, model_name):
    request = dict(model=model_name, max_tokens=5, temperature=0, n=2, stream_options={"include_usage": True})
    request["extra_body"] = {"ignore_eos": True}
    _, finish, chunks = stream_texts(
        client, chat=True, messages=[{"role": "user", "content": "Hi"}], **request
    )
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1]) and set(finish) == {0, 1}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, None),  # not in the vocabulary: the engine says so
        ({"stop_token_ids": [10**9]}, None),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 20, "max_tokens": 5}, None),
        ({"stream": True, "stream_options": {"continuous_usage": True}}, "stream_options.continuous_usage"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"functions": []}, "functions"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_bad_or_unsupported_sampling_fields_are_400_naming_them(client, model_name, fields, param, stream):
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 3, **fields}
    error = refused(client, "completions", body, stream)
    if param is not None:
        assert error["param"] == param, error
    key = next(iter(fields))
    assert key.split(".")[0] in error["message"] or key in error["message"], error
