"""Penalties, logit_bias and min_tokens over a whole batch's logits, one tensor op per kind.

Each kind gathers the per-sequence tensors of the rows that use it (a loop over sequences, never over
tokens), so a batch where nobody asks for one costs nothing. The order is the one transformers'
processors run in when all are given: logit_bias (its SequenceBias), repetition penalty, then the
frequency/presence penalties, the min_tokens mask, so that a masked end token stays masked, and the
grammar's mask last.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from router.grammar import TokenMatcher, apply_grammar_masks


class SamplingState(Protocol):
    """What these read of router.sampling.SamplingState (which imports this module)."""

    params: Any
    counts: torch.Tensor | None
    prompt_mask: torch.Tensor | None
    suppress_ids: torch.Tensor | None
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    matcher: TokenMatcher | None


def _penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    rows = [i for i, s in enumerate(states) if s.counts is not None]
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device)
    counts = torch.stack([states[i].counts for i in rows]).to(logits.dtype)
    seen = torch.stack([states[i].prompt_mask for i in rows]) | (counts > 0)

    def column(name: str) -> torch.Tensor:
        values = [getattr(states[i].params, name) for i in rows]
        return torch.tensor(values, dtype=logits.dtype, device=logits.device)[:, None]

    sub = logits[index]
    repetition = column("repetition_penalty")
    penalised = torch.where(sub < 0, sub * repetition, sub / repetition)
    sub = torch.where(seen, penalised, sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    return logits.index_copy(0, index, sub)


def _scatter(
    logits: torch.Tensor, rows: list[int], ids: list[torch.Tensor], values: torch.Tensor | float, add: bool
) -> torch.Tensor:
    row_ids = torch.cat([torch.full_like(t, r) for r, t in zip(rows, ids, strict=True)])
    columns = torch.cat(ids)
    if not isinstance(values, torch.Tensor):
        values = torch.full(columns.shape, values, dtype=logits.dtype, device=logits.device)
    return logits.index_put((row_ids, columns), values.to(logits.dtype), accumulate=add)


def process_logits(logits: torch.Tensor, states: list[SamplingState], steps: list[int]) -> torch.Tensor:
    """The logits the sampler draws from; a new tensor (never the caller's) when anything applies.

    steps[i] is how many tokens row i has generated (what min_tokens compares with).
    """
    biased = [i for i, s in enumerate(states) if s.bias_ids is not None]
    if biased:
        values = torch.cat([states[i].bias_values for i in biased])
        logits = _scatter(logits, biased, [states[i].bias_ids for i in biased], values, add=True)
    logits = _penalties(logits, states)
    short = [
        i
        for i, (s, step) in enumerate(zip(states, steps, strict=True))
        if s.suppress_ids is not None and step < s.params.min_tokens
    ]
    if short:
        logits = _scatter(logits, short, [states[i].suppress_ids for i in short], float("-inf"), add=False)
    return apply_grammar_masks(logits, [s.matcher for s in states])
