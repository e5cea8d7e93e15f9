"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention, Llama-style pre-norm layers, dense
MLPs on the first `first_k_dense_replace` layers, then group-limited sigmoid routing with a selection bias,
a routed scaling factor and shared experts on the router.

The KV cache holds, per token and layer, the normed latent and the rotated shared key part
(kv_lora_rank + qk_rope_head_dim values). Attention runs in the weight-absorbed form: each head's
non-rotary query goes through its slice of kv_b_proj into latent space and is scored against the
cached latents; the attended latents go through the value slice of kv_b_proj, then o_proj. Nothing
is expanded per head for the cached tokens.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from router.config import ModelConfig, RawConfig
from router.gating import GATING
from router.kv_cache import AttentionBatch, KVCache
from router.layers import (
    MoEBlock,
    MoEGate,
    PagedAttention,
    PreNormDecoderLayer,
    RMSNorm,
    Rope,
    RouterModel,
    apply_rope,
    layer_mlp,
)

ARCHITECTURE = "DeepseekV3ForCausalLM"
# transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


def apply_rope_interleaved(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rope on the pairs (x0, x1), (x2, x3), ...; the result laid out as transformers lays it out (the
    pairs' first members, then their second ones), which q and k share, so their products are exact."""
    cos, sin = rope
    half = cos.shape[-1] // 2
    cos, sin = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LatentAttention(PagedAttention):
    """MLA: `q_a_proj` / `q_a_layernorm` / `q_b_proj` (or `q_proj`), `kv_a_proj_with_mqa`,
    `kv_a_layernorm`, `kv_b_proj`, `o_proj`; rope on the qk_rope_head_dim part only."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        hidden = config.hidden_size
        self.nope, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.rank, self.v_dim = config.kv_lora_rank, config.v_head_dim
        q_dim = self.heads * (self.nope + self.rope_dim)
        self.low_rank_q = bool(config.q_lora_rank)
        if self.low_rank_q:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, hidden, bias=False)
        # the full query head, as transformers scales it, times YaRN's mscale(factor, mscale_all_dim)**2
        self.scale = (self.nope + self.rope_dim) ** -0.5 * config.rope.softmax_mscale()
        self.rotate = apply_rope_interleaved if config.rope_interleave else apply_rope

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q_nope, q_pe = q.view(tokens, self.heads, -1).split([self.nope, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        # the cache entry: one "head" [latent | rotated k_pe] per token, keys and values at once
        entry = torch.cat([self.kv_a_layernorm(latent)[:, None], self.rotate(k_pe[:, None], rope)], -1)
        weight = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        w_key, w_value = weight[:, : self.nope], weight[:, self.nope :]
        query = torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_key), self.rotate(q_pe, rope)], -1)
        attended = self.attend(query, entry, entry, cache, batch)[..., : self.rank]
        out = torch.einsum("thr,hvr->thv", attended, w_value)
        return self.o_proj(out.reshape(tokens, -1))


class DeepseekGate(MoEGate):
    """`mlp.gate.weight` and its selection bias `mlp.gate.e_score_correction_bias`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))
        self.gating = partial(GATING[config.gating], n_group=config.n_group, topk_group=config.topk_group)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x, self.e_score_correction_bias)


class DeepseekMoE(MoEBlock):
    """The gate and `mlp.shared_experts` (n_shared_experts experts wide) here, routed experts on shards."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__(config, moe_index)
        self.gate = DeepseekGate(config)

    @property
    def gate_module(self) -> MoEGate:
        return self.gate


class Model(RouterModel):
    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        mlp = layer_mlp(config, layer, DeepseekMoE)
        return PreNormDecoderLayer(config, LatentAttention(config, layer), mlp)


def _check_routing(raw: RawConfig, experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    if n_group < 1 or experts % n_group or experts // n_group < 2:
        raw.fail(f"n_group {n_group} must divide n_routed_experts {experts} into groups of 2 or more")
    if not 1 <= topk_group <= n_group:
        raw.fail(f"topk_group {topk_group} must be within 1..n_group ({n_group})")
    if topk_group * (experts // n_group) < top_k:
        raw.fail(f"topk_group {topk_group} groups hold fewer experts than num_experts_per_tok {top_k}")


def parse_config(raw: RawConfig) -> ModelConfig:
    if raw.get("scoring_func", "sigmoid") != "sigmoid":
        raw.fail(f"scoring_func {raw.raw['scoring_func']!r} is not supported (DeepSeek-V3 routes on sigmoid)")
    if raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raw.fail(f"topk_method {raw.raw['topk_method']!r} is not supported (only 'noaux_tc')")
    if int(raw.get("moe_layer_freq", 1)) != 1:
        raw.fail(f"moe_layer_freq {raw.raw['moe_layer_freq']!r} is not supported (only 1)")
    layers = int(raw.need("num_hidden_layers"))
    heads = int(raw.need("num_attention_heads"))
    if int(raw.get("num_key_value_heads", heads)) != heads:
        raw.fail("num_key_value_heads must equal num_attention_heads (latent attention has no KV groups)")
    dense = int(raw.get("first_k_dense_replace", 3))
    if not 0 <= dense < layers:
        raw.fail(f"first_k_dense_replace must be within 0..{layers - 1}")
    rope_dim = int(raw.need("qk_rope_head_dim"))
    if rope_dim < 2 or rope_dim % 2:
        raw.fail(f"qk_rope_head_dim {rope_dim} must be even and positive")
    experts = int(raw.get("n_routed_experts") or raw.need("num_local_experts"))
    n_group, topk_group = int(raw.get("n_group", 8)), int(raw.get("topk_group", 4))
    _check_routing(raw, experts, int(raw.need("num_experts_per_tok")), n_group, topk_group)
    return raw.build(
        architecture=ARCHITECTURE,
        intermediate_size=int(raw.need("intermediate_size")),
        moe_intermediate_size=int(raw.need("moe_intermediate_size")),
        num_experts=experts,
        num_shared_experts=int(raw.get("n_shared_experts", 1)),
        num_dense_layers=dense,
        moe_layer_ids=tuple(range(dense, layers)),
        layer_types=("full_attention",) * layers,
        sliding_window=0,
        head_dim=rope_dim,  # what rope rotates, as transformers' DeepseekV3Config sets it
        q_lora_rank=int(raw.get("q_lora_rank", 0)),
        kv_lora_rank=int(raw.need("kv_lora_rank")),
        qk_nope_head_dim=int(raw.need("qk_nope_head_dim")),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(raw.need("v_head_dim")),
        rope_interleave=bool(raw.get("rope_interleave", True)),
        n_group=n_group,
        topk_group=topk_group,
        route_scale=float(raw.get("routed_scaling_factor", 2.5)),
        gating="sigmoid_grouped" if raw.get("norm_topk_prob", True) else "sigmoid_grouped_unnormalised",
    )
