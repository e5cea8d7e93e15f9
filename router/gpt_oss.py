"""GPT-OSS (GptOssForCausalLM): Llama layers whose attention has q/k/v/o biases and a learned sink
logit per head, sliding and full layers alternating as `layer_types` lists them, YaRN rope, a router
with a bias whose top-k logits are softmaxed among themselves, and experts with biases and a clamped
SwiGLU (experts/kind.py) stored fused with gate and up in alternating columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from router.config import ModelConfig, RawConfig
from router.layers import MoEBlock, MoEGate, PreNormDecoderLayer, RotaryAttention, RouterModel

ARCHITECTURE = "GptOssForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")
DEFAULT_THETA = 150000.0  # GptOssConfig's defaults, where a config names none
DEFAULT_WINDOW = 128
DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


class BiasedGate(MoEGate):
    """`mlp.router.weight` and `mlp.router.bias`: the logits are one affine map, as the reference's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight, self.bias)
        return self.gating(logits, bias, self.top_k, self.route_scale)


class GptOssMoE(MoEBlock):
    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__(config, moe_index)
        self.router = BiasedGate(config)

    @property
    def gate_module(self) -> MoEGate:
        return self.router


class Model(RouterModel):
    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        return PreNormDecoderLayer(
            config, RotaryAttention(config, layer, qk_norm=False), GptOssMoE(config, layer)
        )


def parse_config(raw: RawConfig) -> ModelConfig:
    if not raw.get("rope_parameters") and not raw.get("rope_scaling"):
        raw = RawConfig(raw.raw | {"rope_parameters": DEFAULT_ROPE}, raw.source)
    layers = int(raw.need("num_hidden_layers"))
    layer_types = raw.get("layer_types")
    if layer_types is None:  # the reference's default: sliding first, then every other layer
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
        raw.fail(f"layer_types must list {layers} entries from {LAYER_TYPES}")
    theta = (raw.get("rope_parameters") or {}).get("rope_theta") or raw.get("rope_theta") or DEFAULT_THETA
    return raw.build(
        architecture=ARCHITECTURE,
        rope_theta=float(theta),
        intermediate_size=int(raw.need("intermediate_size")),
        moe_intermediate_size=int(raw.need("intermediate_size")),
        num_experts=int(raw.need("num_local_experts")),
        moe_layer_ids=tuple(range(layers)),
        layer_types=tuple(layer_types),
        sliding_window=int(raw.raw.get("sliding_window", DEFAULT_WINDOW) or 0),
        gating="topk_softmax",
        attention_bias=bool(raw.raw.get("attention_bias", True)),
        attention_sinks=True,
        expert_activation="clamped_swiglu",
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        expert_biases=True,
        experts_interleaved=True,
    )
