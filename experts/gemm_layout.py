"""The memory order a weight matrix is held in, so that the GEMMs decode runs read it fastest.

A weight is [..., out, in] (what F.linear takes). Decode multiplies it by one or two rows at a time: one
per sequence for the router's projections at one prompt, and one or two per expert for the routed
experts. For those, the CPU's fp32 GEMM reads W^T ([in, out] memory) row by row about 1.6x as fast as W
(one row times 512 x 512: 44 against 70 us), and no slower for more rows. bf16 GEMMs are faster on
[out, in], and a GPU is indifferent. The values and shapes never change, only the strides
(benchmarks/results/expert_compute-*.json: the `memory` column).
"""

from __future__ import annotations

import torch


def reads_transposed(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether [..., out, in] weights on `device` in `dtype` are best held with [..., in, out] memory."""
    return device.type == "cpu" and dtype == torch.float32


def held_as(weights: torch.Tensor, transposed: bool) -> torch.Tensor:
    """`weights` [..., out, in] over dense [..., in, out] memory if `transposed`, else [..., out, in];
    no copy where they already are."""
    if transposed:
        return weights.transpose(-2, -1).contiguous().transpose(-2, -1)
    return weights.contiguous()


def in_gemm_layout(weights: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """`weights` [..., out, in], on `device` (default: where they are), in the memory order
    reads_transposed picks there. The order is made before the move, so weights moved to a GPU are
    never held twice there."""
    device = weights.device if device is None else torch.device(device)
    return held_as(weights, reads_transposed(device, weights.dtype)).to(device)


def empty_weights(num: int, out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU [num, out, in] buffer already in_gemm_layout, for a loader to fill."""
    if reads_transposed(torch.device("cpu"), dtype):
        return torch.empty(num, in_features, out_features, dtype=dtype).transpose(1, 2)
    return torch.empty(num, out_features, in_features, dtype=dtype)
