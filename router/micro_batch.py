"""Two-batch overlap: a step's sequences as micro-batches that take turns through the layers.

Each micro-batch's pass over the model is a generator that yields right after it dispatched a MoE
layer's tokens (and computed its shared expert). Driving the passes in turn makes the router compute
micro-batch B's attention, gate and shared expert while the expert ranks compute A's routed experts,
then A's next layer while they compute B's, and so on.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch

from router.kv_cache import AttentionBatch

# Below this many tokens a step is not split: too little work per micro-batch to hide the other's.
MIN_OVERLAP_TOKENS = 8

Pass = Generator[None, None, torch.Tensor]


@dataclass
class MicroBatch:
    token_ids: torch.Tensor  # [T] the micro-batch's flat tokens
    batch: AttentionBatch
    logits_index: torch.Tensor  # rows of token_ids whose logits are wanted


def split_point(lengths: Sequence[int], min_tokens: int) -> int | None:
    """Where to cut a step's sequences (by index) into two micro-batches of about equal tokens;
    None when the step is too small to split (fewer than two sequences or `min_tokens` tokens)."""
    total = sum(lengths)
    if len(lengths) < 2 or total < min_tokens:
        return None
    best, best_gap, seen = 1, total, 0
    for i, n in enumerate(lengths[:-1], start=1):
        seen += n
        gap = abs(2 * seen - total)
        if gap < best_gap:
            best, best_gap = i, gap
    return best


def interleave(passes: list[Pass]) -> list[torch.Tensor]:
    """Runs the passes in turn, one MoE layer at a time; returns each pass's result, in order."""
    results: list[torch.Tensor | None] = [None] * len(passes)
    live = list(range(len(passes)))
    while live:
        for i in list(live):
            try:
                next(passes[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results
