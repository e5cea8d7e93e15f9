"""Top-k expert selection.

Each gating function maps fp32 router logits [T, E] to (expert ids [T, k] int64, weights [T, k] fp32).
AFMoE's sigmoid, softmax top-k with (Mixtral, Qwen3-MoE with norm_topk_prob) or without
(Qwen3-MoE otherwise) renormalisation, and GPT-OSS's top-k then softmax over the selected logits; an
adapter names its entry in ModelConfig.gating.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GatingFn = Callable[[torch.Tensor, torch.Tensor | None, int, float], tuple[torch.Tensor, torch.Tensor]]


def afmoe_sigmoid_topk(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select on sigmoid scores + bias; weigh by the unbiased scores, normalised, times route_scale."""
    scores = torch.sigmoid(logits.float())
    selection = scores + bias if bias is not None else scores
    ids = torch.topk(selection, k=k, dim=-1).indices
    weights = scores.gather(-1, ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * route_scale
    return ids, weights


def softmax_topk(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen3-MoE: softmax over all experts, top-k, renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k=k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True) * route_scale
    return ids, weights


def softmax_topk_unnormalised(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE without norm_topk_prob: the selected softmax probabilities as they are."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k=k, dim=-1)
    return ids, weights * route_scale


def topk_softmax(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-OSS: top-k of the logits (plus `bias`, where the gate did not add it), softmax over those k."""
    if bias is not None:
        logits = logits + bias
    values, ids = torch.topk(logits.float(), k=k, dim=-1)
    return ids, torch.softmax(values, dim=-1) * route_scale


GATING: dict[str, GatingFn] = {
    "afmoe_sigmoid": afmoe_sigmoid_topk,
    "softmax": softmax_topk,
    "softmax_unnormalised": softmax_topk_unnormalised,
    "topk_softmax": topk_softmax,
}
