"""Qwen3-MoE (Qwen3MoeForCausalLM): Llama layers with per-head q/k norms, routed MoE on every
`decoder_sparse_step`-th layer outside `mlp_only_layers`, softmax top-k renormalised only with
`norm_topk_prob`."""

from __future__ import annotations

from torch import nn

from router.config import ModelConfig, RawConfig
from router.layers import PreNormDecoderLayer, RotaryAttention, RouterModel, SparseMoE, layer_mlp

ARCHITECTURE = "Qwen3MoeForCausalLM"


class Model(RouterModel):
    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        mlp = layer_mlp(config, layer, SparseMoE)
        return PreNormDecoderLayer(config, RotaryAttention(config, layer, qk_norm=True), mlp)


def parse_config(raw: RawConfig) -> ModelConfig:
    raw.refuse_if_set("use_sliding_window", "Qwen3-MoE is served with full attention only")
    layers = int(raw.need("num_hidden_layers"))
    step = int(raw.get("decoder_sparse_step", 1))
    if step < 1:
        raw.fail("decoder_sparse_step must be >= 1")
    dense_only = set(raw.get("mlp_only_layers", []))
    num_experts = int(raw.get("num_experts") or raw.need("num_local_experts"))
    moe = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
    if not moe:
        raw.fail("no layer has a routed MoE block (decoder_sparse_step / mlp_only_layers)")
    return raw.build(
        architecture=ARCHITECTURE,
        intermediate_size=int(raw.need("intermediate_size")),
        moe_intermediate_size=int(raw.need("moe_intermediate_size")),
        num_experts=num_experts,
        moe_layer_ids=moe,
        layer_types=("full_attention",) * layers,
        sliding_window=0,
        gating="softmax" if raw.get("norm_topk_prob", False) else "softmax_unnormalised",
    )
