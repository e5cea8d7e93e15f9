"""The router's Linears on the CPU's decode kernel where a step gives them only a few rows.

At a small batch every projection multiplies a cold weight by one or a few rows, which torch's fp32 GEMM
reads at a fraction of the bandwidth one core streams; experts/gemv_kernel.py reads it once, in memory
order. Larger batches keep F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experts.gemm_layout import reads_transposed
from experts.gemv_kernel import MAX_ROWS_PER_MATRIX, Gemv, load_gemv


class DecodeLinear(nn.Linear):
    """nn.Linear whose calls of up to MAX_ROWS_PER_MATRIX rows run the C kernel; same parameters."""

    gemv: Gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > MAX_ROWS_PER_MATRIX * self.in_features:
            return F.linear(x, self.weight, self.bias)
        y = self.gemv.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_decode_linears(model: nn.Module) -> int:
    """Swap every fp32 CPU nn.Linear of `model` whose weight is over [in, out] memory (as the loader
    holds it, experts/gemm_layout.py) for a DecodeLinear sharing its parameters; the number swapped,
    0 where the kernel cannot be built."""
    gemv = load_gemv()
    if gemv is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and _reads_rows(child.weight):
                setattr(parent, name, _decode_linear(child, gemv))
                swapped += 1
    return swapped


def _reads_rows(weight: torch.Tensor) -> bool:
    """Held over [in, out] memory, where gemm_layout holds it so (fp32 on the CPU)."""
    return reads_transposed(weight.device, weight.dtype) and weight.t().is_contiguous()


def _decode_linear(linear: nn.Linear, gemv: Gemv) -> DecodeLinear:
    bias = linear.bias is not None
    decode = DecodeLinear(linear.in_features, linear.out_features, bias, device="meta")
    decode.weight, decode.bias, decode.gemv = linear.weight, linear.bias, gemv
    return decode
