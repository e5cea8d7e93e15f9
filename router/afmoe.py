"""AFMoE (Trinity, AfmoeForCausalLM): what this architecture is, on the shared blocks of router/layers.py.

Gated attention with q/k norms and rope on the sliding layers only, four norms per decoder layer,
sigmoid routing with an expert bias and a route scale, shared experts on the router, muP embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from router.config import ModelConfig, RawConfig
from router.kv_cache import AttentionBatch, KVCache
from router.layers import (
    MoEBlock,
    MoEGate,
    RMSNorm,
    Rope,
    RotaryAttention,
    RouterModel,
    apply_rope,
    feed_forward,
    layer_mlp,
)

ARCHITECTURE = "AfmoeForCausalLM"
LAYER_TYPES = ("sliding_attention", "full_attention")


class Attention(RotaryAttention):
    """q/k RMSNorm, rope on sliding-window layers only, and a sigmoid gate on the attention output."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer, qk_norm=True)
        self.gate_proj = nn.Linear(config.hidden_size, self.heads * config.head_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        q, k, v = self.project(x)
        if self.sliding:  # global layers carry no positional encoding
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = self.attend(q, k, v, cache, batch)
        out = out.reshape(x.shape[0], -1) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(out)


class AfmoeMoE(MoEBlock):
    """`mlp.router.gate.weight`, `mlp.expert_bias` (selection only) and `mlp.shared_experts`."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__(config, moe_index)
        self.router = nn.ModuleDict({"gate": MoEGate(config)})
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))

    @property
    def gate_module(self) -> MoEGate:
        return self.router["gate"]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_module(x, self.expert_bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp: nn.Module = layer_mlp(config, layer, AfmoeMoE)

    def run(self, x, rope: Rope, cache: KVCache, batch: AttentionBatch, experts, tag: int):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, batch))
        h = yield from feed_forward(self.mlp, self.pre_mlp_layernorm(x), experts, tag)
        return x + self.post_mlp_layernorm(h)


class AfmoeRouterModel(RouterModel):
    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        return DecoderLayer(config, layer)

    def embed_scale(self) -> float | None:
        return self.config.hidden_size**0.5 if self.config.mup_enabled else None


def parse_config(raw: RawConfig) -> ModelConfig:
    layers = int(raw.need("num_hidden_layers"))
    layer_types = raw.get("layer_types")
    if layer_types is None:
        every = int(raw.get("global_attn_every_n_layers") or 4)
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
        raw.fail(f"layer_types must list {layers} entries from {LAYER_TYPES}")
    dense = int(raw.get("num_dense_layers") or 0)
    if not 0 <= dense <= layers:
        raw.fail(f"num_dense_layers must be within 0..{layers}")
    return raw.build(
        architecture=ARCHITECTURE,
        intermediate_size=int(raw.need("intermediate_size")),
        moe_intermediate_size=int(raw.need("moe_intermediate_size")),
        num_dense_layers=dense,
        moe_layer_ids=tuple(range(dense, layers)),
        num_experts=int(raw.need("num_experts")),
        num_shared_experts=int(raw.get("num_shared_experts") or 0),
        route_scale=float(raw.get("route_scale") or 1.0),
        layer_types=tuple(layer_types),
        mup_enabled=bool(raw.get("mup_enabled")),
        gating="afmoe_sigmoid",
    )


Model = AfmoeRouterModel
