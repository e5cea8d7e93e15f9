"""Penalties, logit_bias and min_tokens: the same next-token distribution as transformers' processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from router.logits_processors import process_logits
from router.sampling import SamplingParams, SamplingState, sample

VOCAB = 40
EOS = (3, 7)


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _state(prompt: list[int], output: list[int], **params) -> SamplingState:
    """A request that has generated `output` after `prompt`, through the engine's own bookkeeping."""
    state = SamplingState.for_request(SamplingParams(max_tokens=64, **params), prompt, VOCAB, EOS)
    for token in output:
        state.observe(token)
    return state


def _distribution(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1)


PROMPTS = [[1, 2, 2, 5], [9, 9, 9], [0, 11, 12, 13, 14], [30]]
OUTPUTS = [[5, 6, 6], [], [12, 39, 39, 39], [30, 31]]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = _logits(len(PROMPTS), 0)
    states = [_state(p, o, repetition_penalty=penalty) for p, o in zip(PROMPTS, OUTPUTS, strict=True)]
    ours = process_logits(logits, states, [len(o) for o in OUTPUTS])
    reference = RepetitionPenaltyLogitsProcessor(penalty)
    for row, (prompt, output) in enumerate(zip(PROMPTS, OUTPUTS, strict=True)):
        theirs = reference(torch.tensor([prompt + output]), logits[row : row + 1].clone())
        torch.testing.assert_close(_distribution(ours[row]), _distribution(theirs[0]))
    assert not torch.equal(ours, logits)


def test_logit_bias_matches_sequence_bias() -> None:
    logits = _logits(2, 1)
    bias = ((4, 5.0), (17, -100.0), (39, 0.25))
    states = [_state([1], [], logit_bias=bias), _state([1], [])]
    ours = process_logits(logits, states, [0, 0])
    theirs = SequenceBiasLogitsProcessor({(t,): b for t, b in bias})(torch.tensor([[1]]), logits[:1].clone())
    torch.testing.assert_close(ours[0], theirs[0])
    assert torch.equal(ours[1], logits[1])  # a row without a bias is untouched


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_tokens_matches_min_new_tokens(generated: int) -> None:
    logits = _logits(1, 2)
    prompt = [8, 9]
    output = list(range(10, 10 + generated))
    state = _state(prompt, output, min_tokens=3)
    ours = process_logits(logits, [state], [generated])
    reference = MinNewTokensLengthLogitsProcessor(len(prompt), 3, list(EOS))
    theirs = reference(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(_distribution(ours[0]), _distribution(theirs[0]))


def test_min_tokens_also_masks_stop_token_ids_and_not_eos_when_ignored() -> None:
    logits = torch.zeros(1, VOCAB)
    state = _state([1], [], min_tokens=2, stop_token_ids=(20,), ignore_eos=True)
    out = process_logits(logits, [state], [0])
    assert torch.isinf(out[0, 20]) and bool(torch.isfinite(out[0, list(EOS)]).all())


def test_frequency_and_presence_penalties_follow_openai() -> None:
    logits = _logits(1, 3)
    output = [5, 5, 5, 8]
    state = _state([5, 2], output, frequency_penalty=0.7, presence_penalty=-0.4)
    ours = process_logits(logits, [state], [len(output)])
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    expected = logits[0] - 0.7 * counts - (-0.4) * (counts > 0).float()  # the prompt's 2 is not counted
    torch.testing.assert_close(ours[0], expected)


def test_all_together_match_transformers_chain_in_one_mixed_batch() -> None:
    logits = _logits(3, 4)
    prompt, output = [2, 3, 4], [4, 6]
    params = dict(repetition_penalty=1.5, logit_bias=((6, 2.0), (3, 1.0)), min_tokens=4)
    states = [
        _state(prompt, output, **params),
        _state([1], [], temperature=1.0),
        _state(prompt, output, **params),
    ]
    ours = process_logits(logits, states, [2, 0, 2])
    chain = LogitsProcessorList(
        [
            SequenceBiasLogitsProcessor({(6,): 2.0, (3,): 1.0}),
            RepetitionPenaltyLogitsProcessor(1.5),
            MinNewTokensLengthLogitsProcessor(len(prompt), 4, list(EOS)),
        ]
    )
    for row in (0, 2):
        theirs = chain(torch.tensor([prompt + output]), logits[row : row + 1].clone())
        torch.testing.assert_close(_distribution(ours[row]), _distribution(theirs[0]))
    assert torch.equal(ours[1], logits[1])


def test_greedy_sampling_uses_processed_logits_and_leaves_the_input_alone() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 5.0  # an end token, the argmax
    before = logits.clone()
    state = _state([1], [], min_tokens=1, logit_bias=((21, 3.0),))
    assert int(sample(logits, [state], [0])[0]) == 21
    assert torch.equal(logits, before)


def test_resumed_request_counts_its_earlier_output() -> None:
    params = SamplingParams(max_tokens=8, frequency_penalty=1.0, step_offset=2)
    state = SamplingState.for_request(params, [1, 2, 9, 9], VOCAB)
    assert state.counts is not None and int(state.counts[9]) == 2 and int(state.counts[1]) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(logit_bias=((1, 101.0),)), "logit_bias"),
        (dict(min_tokens=9, max_tokens=8), "min_tokens"),
    ],
)
def test_out_of_range_fields_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)
