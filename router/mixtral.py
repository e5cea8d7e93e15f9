"""Mixtral (MixtralForCausalLM): Llama layers, every MLP a routed MoE, softmax top-k renormalised,
a sliding window on every layer when the config sets one."""

from __future__ import annotations

from torch import nn

from router.config import ModelConfig, RawConfig
from router.layers import PreNormDecoderLayer, RotaryAttention, RouterModel, SparseMoE

ARCHITECTURE = "MixtralForCausalLM"
# transformers 5 writes Mixtral's MoE block under its published name
CHECKPOINT_ALIASES = ((".mlp.", ".block_sparse_moe."),)


class Model(RouterModel):
    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        return PreNormDecoderLayer(
            config, RotaryAttention(config, layer, qk_norm=False), SparseMoE(config, layer)
        )


def parse_config(raw: RawConfig) -> ModelConfig:
    layers = int(raw.need("num_hidden_layers"))
    kind = "sliding_attention" if raw.get("sliding_window") else "full_attention"
    width = int(raw.need("intermediate_size"))
    return raw.build(
        architecture=ARCHITECTURE,
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts=int(raw.need("num_local_experts")),
        moe_layer_ids=tuple(range(layers)),
        layer_types=(kind,) * layers,
        gating="softmax",
    )
