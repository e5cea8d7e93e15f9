"""Top-k expert selection.

Each gating function maps fp32 router logits [T, E] to (expert ids [T, k] int64, weights [T, k] fp32).
AFMoE's sigmoid, softmax top-k with (Mixtral, Qwen3-MoE with norm_topk_prob) or without
(Qwen3-MoE otherwise) renormalisation, DeepSeek-V3's group-limited sigmoid (its gate passes the
group counts), and GPT-OSS's top-k then softmax over the selected logits; an adapter names its entry
in ModelConfig.gating.
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


def grouped_sigmoid_topk(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    route_scale: float,
    n_group: int = 1,
    topk_group: int = 1,
    normalise: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: the experts split into n_group equal groups, a group scored by the sum of its two
    best biased sigmoid scores; top-k among the topk_group best groups' experts. Weights are the
    unbiased scores, renormalised when `normalise`, times route_scale."""
    scores = torch.sigmoid(logits.float())
    choice = scores + bias if bias is not None else scores
    tokens, experts = choice.shape
    per_group = experts // n_group
    group_scores = choice.view(tokens, n_group, per_group).topk(2, dim=-1).values.sum(-1)
    groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
    choice = choice.masked_fill(~kept.repeat_interleave(per_group, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return ids, weights * route_scale


def grouped_sigmoid_topk_unnormalised(
    logits: torch.Tensor, bias: torch.Tensor | None, k: int, route_scale: float, **groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 without norm_topk_prob."""
    return grouped_sigmoid_topk(logits, bias, k, route_scale, normalise=False, **groups)


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
    "sigmoid_grouped": grouped_sigmoid_topk,
    "sigmoid_grouped_unnormalised": grouped_sigmoid_topk_unnormalised,
    "topk_softmax": topk_softmax,
}
