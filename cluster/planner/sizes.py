"""Sizes of an AFMoE model: parameters by where they live, KV cache and exchange bytes. Torch-free.

The parameter accounting follows transformers' AfmoeForCausalLM module by module, or, for a model with
latent attention, DeepseekV3ForCausalLM (tests compare both with a real model's parameter count),
split the way this engine places it: routed experts on the expert shards, everything else on the router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from router.config import ModelConfig

# bytes per weight element; fp8 stores linear weights in one byte, embeddings and norms stay bf16
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
ACTIVATION_BYTES = 2  # hidden states on the wire and KV cache entries: bf16
KV_BYTES = 2
EXPERT_BIAS_BYTES = 4  # fp32, one per routed expert and MoE layer


@dataclass(frozen=True)
class Params:
    """Parameter counts of one model, by kind."""

    embeddings: int  # the input table
    lm_head: int  # 0 when tied to the input table
    norms: int
    attention: int  # q, k, v, o and the output gate of every layer
    dense_mlp: int
    shared_experts: int
    router_gates: int
    expert_bias: int
    routed_per_expert: int  # one routed expert of one MoE layer
    routed: int

    @property
    def total(self) -> int:
        return self.router_total + self.routed

    @property
    def router_total(self) -> int:
        """Everything the router actor holds: all but the routed experts."""
        return (
            self.embeddings
            + self.lm_head
            + self.norms
            + self.attention
            + self.dense_mlp
            + self.shared_experts
            + self.router_gates
            + self.expert_bias
        )

    @property
    def router_linear(self) -> int:
        """Router weights every decode step reads in full: all but the input table's unused rows."""
        return self.attention + self.dense_mlp + self.shared_experts + self.router_gates + self.lm_head


def latent_attention_params(cfg: ModelConfig) -> int:
    """One DeepSeek-V3 MLA layer: the (low-rank) query, kv_a (latent and shared rope key), kv_b, o."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q_out = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q = (h + q_out) * cfg.q_lora_rank if cfg.q_lora_rank else h * q_out
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv_a + kv_b + heads * cfg.v_head_dim * h


def count_params(cfg: ModelConfig) -> Params:
    h, heads, kv_heads, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layers, moe = cfg.num_hidden_layers, len(cfg.moe_layers)
    dense = layers - moe
    per_expert = 3 * h * cfg.moe_intermediate_size
    # q, gate (h -> heads*d), k, v (h -> kv_heads*d), o (heads*d -> h); four norms and q/k norms a layer
    attention = layers * (3 * h * heads * d + 2 * h * kv_heads * d)
    norms = layers * (4 * h + 2 * d) + h
    if cfg.kv_lora_rank:
        attention = layers * latent_attention_params(cfg)
        norms = layers * (2 * h + cfg.q_lora_rank + cfg.kv_lora_rank) + h
    return Params(
        embeddings=cfg.vocab_size * h,
        lm_head=0 if cfg.tie_word_embeddings else cfg.vocab_size * h,
        norms=norms,
        attention=attention,
        dense_mlp=dense * 3 * h * cfg.intermediate_size,
        shared_experts=moe * per_expert * cfg.num_shared_experts,
        router_gates=moe * cfg.num_experts * h,
        expert_bias=moe * cfg.num_experts,
        routed_per_expert=per_expert,
        routed=moe * cfg.num_experts * per_expert,
    )


def router_weight_bytes(p: Params, dtype: str) -> int:
    return (
        p.router_linear * WEIGHT_BYTES[dtype]
        + (p.embeddings + p.norms) * 2
        + p.expert_bias * EXPERT_BIAS_BYTES
    )


def routed_bytes(p: Params, dtype: str) -> int:
    return p.routed * WEIGHT_BYTES[dtype]


def expert_bytes_all_layers(cfg: ModelConfig, p: Params, dtype: str) -> int:
    """One expert index across every MoE layer: the unit a shard holds."""
    return len(cfg.moe_layers) * p.routed_per_expert * WEIGHT_BYTES[dtype]


def kv_bytes_per_sequence(cfg: ModelConfig, max_model_len: int, block_size: int) -> int:
    return cfg.kv_bytes_per_sequence(max_model_len, block_size, KV_BYTES)


def kv_bytes_read(cfg: ModelConfig, context: int) -> int:
    """KV bytes one decode step reads for one sequence holding `context` tokens."""
    return sum(
        (min(context, cfg.sliding_window) if cfg.is_sliding(i) else context)
        * cfg.kv_bytes_per_token_layer(KV_BYTES, i)
        for i in range(cfg.num_hidden_layers)
    )


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """Scores and weighted sums of one decode token over `context` cached tokens in every layer; latent
    attention scores over the latent and rope dims and sums over the latent, for every head."""
    per_head = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.kv_lora_rank else 2 * cfg.head_dim
    return 2 * context * cfg.num_attention_heads * per_head * cfg.num_hidden_layers


def shard_sizes(num_experts: int, shards: int) -> list[int]:
    """Experts per shard under the engine's contiguous placement (the first shards take one more)."""
    base, extra = divmod(num_experts, shards)
    return [base + (s < extra) for s in range(shards)]


def hit_probability(num_experts: int, top_k: int, shard_experts: int) -> float:
    """P(a token routes to at least one expert of a shard of `shard_experts`), top-k uniform routing."""
    if num_experts - shard_experts < top_k:
        return 1.0
    return 1.0 - math.comb(num_experts - shard_experts, top_k) / math.comb(num_experts, top_k)


def touched_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts `tokens` tokens route to in one layer: E·(1−(1−k/E)^B)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@dataclass(frozen=True)
class ExchangeBytes:
    """Per token and MoE layer: rows sent (one per destination shard) and bytes each way."""

    rows_expected: float
    rows_max: int
    dispatch_expected: float
    combine_expected: float
    dispatch_max: int
    combine_max: int


def exchange_bytes(cfg: ModelConfig, shards: int) -> ExchangeBytes:
    """Dispatch rows carry the hidden state plus fp32 local ids and weights; combine rows a partial sum."""
    k = cfg.num_experts_per_tok
    sizes = shard_sizes(cfg.num_experts, shards)
    rows = sum(hit_probability(cfg.num_experts, k, n) for n in sizes)
    rows_max = min(k, shards)
    combine_row = cfg.hidden_size * ACTIVATION_BYTES
    dispatch_row = combine_row + 2 * k * 4
    return ExchangeBytes(
        rows,
        rows_max,
        rows * dispatch_row,
        rows * combine_row,
        rows_max * dispatch_row,
        rows_max * combine_row,
    )
