"""Grammar masks in the sampler (in one process): every draw under a schema yields JSON that validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from router.grammar import GrammarCompiler
from router.sampling import SamplingParams, SamplingState, sample
from router.tokenizer import Tokenizer
from tests.json_schemas import SCHEMAS

EOS = [1, 3]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_model_dir(demo_model)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer.hf, len(tokenizer.hf), EOS)


def _generate(
    states: list[SamplingState], vocab: int, seed: int, favour: tuple[int, ...] = ()
) -> list[list[int]]:
    """Decodes a batch under random logits (plus a lean to `favour`) until every grammar has finished."""
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in states]
    for step in range(MAX_TOKENS):
        live = [i for i, s in enumerate(states) if not s.grammar_done]
        if not live:
            break
        logits = torch.randn(len(live), vocab, generator=generator) * 3
        logits[:, list(favour)] += 6.0
        tokens = sample(logits, [states[i] for i in live], [step] * len(live)).tolist()
        for i, token in zip(live, tokens, strict=True):
            states[i].observe(token)
            outputs[i].append(token)
    return outputs


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_draw_under_a_schema_validates(compiler, tokenizer, index):
    schema = SCHEMAS[index]
    grammar = compiler.json(schema)
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=t, seed=s, grammar=grammar)
        for t, s in [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)]
    ]
    free = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=9)
    states = [SamplingState.for_request(p, [5], len(tokenizer.hf), EOS) for p in params]
    outputs = _generate(states, len(tokenizer.hf), seed=index)
    for state, tokens in zip(states, outputs, strict=True):
        assert state.grammar_done, "the grammar did not finish within max_tokens"
        assert tokens[-1] in EOS
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
    # an unconstrained row in the same batch is not masked
    mixed = [SamplingState.for_request(params[1], [5], len(tokenizer.hf), EOS), SamplingState(free, 9)]
    logits = torch.zeros(2, len(tokenizer.hf))
    assert sample(logits, mixed, [0, 0])[1] == sample(logits[1:], [SamplingState(free, 9)], [0])[0]


def test_json_object_gives_an_object(compiler, tokenizer):
    states = [
        SamplingState.for_request(
            SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=s, grammar=compiler.json(None)),
            [5],
            len(tokenizer.hf),
            EOS,
        )
        for s in range(4)
    ]
    closing = tuple(
        tokenizer.encode('"}')
    )  # a free object's keys are unbounded strings: a model that closes them
    for tokens in _generate(states, len(tokenizer.hf), seed=99, favour=closing):
        assert isinstance(json.loads(tokenizer.decode(tokens)), dict)


def test_a_schema_is_compiled_once(compiler):
    before = compiler.compiled
    first = compiler.json({"type": "object", "properties": {"zz": {"type": "boolean"}}})
    again = compiler.json({"properties": {"zz": {"type": "boolean"}}, "type": "object"})
    assert first is again and compiler.compiled == before + 1
