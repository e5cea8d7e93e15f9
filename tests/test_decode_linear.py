"""The router's Linears on the CPU decode kernel (router/decode_linear.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experts.gemm_layout import held_as
from experts.gemv_kernel import MAX_ROWS_PER_MATRIX
from router.decode_linear import DecodeLinear, use_decode_linears


def _linear(in_features: int, out_features: int, bias: bool, transposed: bool = True) -> nn.Linear:
    gen = torch.Generator().manual_seed(in_features + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        weight = torch.randn(out_features, in_features, generator=gen) * 0.1
        linear.weight = nn.Parameter(held_as(weight, transposed), requires_grad=False)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=gen))
    return linear


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (2, 3, 48), (MAX_ROWS_PER_MATRIX + 1, 48), (40, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_equals_f_linear_below_and_above_the_row_limit(shape, bias) -> None:
    model = nn.Sequential(_linear(48, 72, bias))
    assert use_decode_linears(model) == 1 and type(model[0]) is DecodeLinear
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    assert got.shape == (*shape[:-1], 72)
    torch.testing.assert_close(got, F.linear(x, model[0].weight, model[0].bias))


def test_only_fp32_linears_over_in_out_memory_are_swapped_and_parameters_are_shared() -> None:
    """bf16 and checkpoint-order weights stay nn.Linear; a swapped one keeps its parameter, its name in
    the state dict and its parent."""
    inner = nn.Module()
    inner.proj = _linear(16, 8, bias=False)
    model = nn.ModuleDict(
        {"inner": inner, "plain": _linear(16, 8, False, transposed=False), "bf16": _linear(16, 8, False)}
    )
    model["bf16"].weight = nn.Parameter(held_as(model["bf16"].weight.bfloat16(), True), requires_grad=False)
    weight = inner.proj.weight
    names = set(model.state_dict())
    assert use_decode_linears(model) == 1
    assert type(model["inner"].proj) is DecodeLinear and model["inner"].proj.weight is weight
    assert type(model["plain"]) is nn.Linear and type(model["bf16"]) is nn.Linear
    assert set(model.state_dict()) == names
