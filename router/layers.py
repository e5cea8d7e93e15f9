"""Building blocks the architecture adapters (router/afmoe.py, router/mixtral.py, ...) share.

Tokens of all sequences in a step are one flat [T, hidden] tensor; only attention pads, per part of the
step (see kv_cache.AttentionBatch). A step may run as two micro-batches whose passes take turns at every
MoE layer (router/micro_batch.py); decoder layers are generators for that, yielding once per MoE layer
between dispatch and combine. Timing is not done here: whoever wants it hooks the PagedAttention and
MoEGate modules (router/step_stats.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from router.config import ModelConfig
from router.exchange import RoutedExperts
from router.gating import GATING
from router.kv_cache import AttentionBatch, KVCache
from router.micro_batch import MicroBatch, Pass, interleave

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    """Computed in fp32 with an fp32 weight, as the references keep these modules in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)


class MLP(nn.Module):
    """The dense SwiGLU MLP (dense layers, shared experts)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies over the whole head dimension (fp32), and the factor cos and sin are
    multiplied by: the default rope's, or YaRN's blend of interpolated and original frequencies."""
    dim, base, rope = config.head_dim, config.rope_theta, config.rope
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    low, high = rope.yarn_ramp(dim, base)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    interpolated = 1.0 / (rope.factor * pos_freqs)
    return interpolated * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation, rope.yarn_scale()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gather_slots(stored: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """stored [S, ...] at slots [B, L]: [B, L, ...]. index_select, because on the CPU indexing with a
    tensor (stored[slots]) is several times slower for the same gather (torch 2.13)."""
    return stored.index_select(0, slots.reshape(-1)).view(*slots.shape, *stored.shape[1:])


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [T, heads, dim] rotated by the per-token cos/sin [T, dim]."""
    cos, sin = rope
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class PagedAttention(nn.Module):
    """Attention over the paged KV cache; subclasses project q, k, v and the output.

    With `sinks` (GPT-OSS), each head's softmax also counts exp(sink) in its denominator: an extra key
    of zeros whose logit the mask sets to the sink and whose value of zeros adds nothing.
    """

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding = config.is_sliding(layer)
        self.register_parameter(
            "sinks", nn.Parameter(torch.zeros(self.heads)) if config.attention_sinks else None
        )

    def attend(self, q, k, v, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        """q [T, heads, dim], k and v [T, kv_heads, dim] of the step's tokens; stores them in the cache,
        then reads every key a query sees from there (one gather, no concatenation of cached and new).

        A layer whose cache holds one tensor (latent attention) passes it as both k and v.
        """
        group = cache.group_of[self.layer]
        stored = cache.entries[self.layer]
        for part in batch.parts:
            index = part.groups[group]
            for tensor, step in zip(stored, (k, v), strict=False):
                tensor[index.write_slots] = step.index_select(0, index.write_tokens)
        k_cache, v_cache = stored[0], stored[-1]
        out = q.new_empty(*q.shape[:2], v.shape[-1])
        for part in batch.parts:
            index = part.groups[group]
            rows = part.batch * part.max_query
            if part.max_query == 1:  # decodes: one query each, nothing to pad
                queries = q.index_select(0, part.tokens).unsqueeze(1)
            else:
                queries = q.new_zeros(rows, *q.shape[1:])
                queries[part.grid_index] = q.index_select(0, part.tokens)
                queries = queries.view(part.batch, part.max_query, *q.shape[1:])
            keys = gather_slots(k_cache, index.key_slots).transpose(1, 2)
            values = keys if v_cache is k_cache else gather_slots(v_cache, index.key_slots).transpose(1, 2)
            mask = index.mask
            if self.sinks is not None:
                keys, values, mask = self._sink_key(keys, values, mask)
            attended = F.scaled_dot_product_attention(
                queries.transpose(1, 2),
                keys,
                values,
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.heads != k.shape[1],
            )
            attended = attended.transpose(1, 2).reshape(rows, self.heads, -1)
            out[part.tokens] = attended if part.max_query == 1 else attended.index_select(0, part.grid_index)
        return out

    def _sink_key(self, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """keys, values [B, kv_heads, L, dim] and the bool mask [B, 1, Lq, L] with the sink key appended:
        the mask becomes additive, [B, heads, Lq, L + 1]."""
        batch, _, queries, _ = mask.shape
        bias = keys.new_zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        sink = self.sinks.to(keys.dtype).view(1, -1, 1, 1).expand(batch, -1, queries, 1)
        bias = torch.cat([bias.expand(-1, self.heads, -1, -1), sink], -1)

        def with_zero(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[3])], 2)

        return with_zero(keys), with_zero(values), bias


class RotaryAttention(PagedAttention):
    """Llama-style attention: rope on every layer, optional per-head q/k RMSNorm (Qwen3) before it,
    projections with biases where the config says so (GPT-OSS)."""

    def __init__(self, config: ModelConfig, layer: int, qk_norm: bool) -> None:
        super().__init__(config, layer)
        hidden, dim, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.heads * dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * dim, hidden, bias=bias)
        if qk_norm:
            self.q_norm = RMSNorm(dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(dim, config.rms_norm_eps)
        self.qk_norm = qk_norm

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, dim], k and v [T, kv_heads, dim], q and k normed when the model norms them."""
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        q, k, v = self.project(x)
        out = self.attend(apply_rope(q, rope), apply_rope(k, rope), v, cache, batch)
        return self.o_proj(out.reshape(x.shape[0], -1))


class MoEGate(nn.Module):
    """Top-k expert ids and fp32 weights per token (a module, so that hooks can time and count it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size, dtype=torch.float32))
        self.gating = GATING[config.gating]
        self.top_k, self.route_scale = config.num_experts_per_tok, config.route_scale

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        return self.gating(logits, bias, self.top_k, self.route_scale)


class MoEBlock(nn.Module):
    """A routed MoE MLP: gate and `shared_experts` (num_shared_experts experts wide, one MLP; none
    without) here, the routed experts on the expert shards."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__()
        self.moe_index = moe_index
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    @property
    def gate_module(self) -> MoEGate:
        raise NotImplementedError

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_module(x)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """What the router adds beside the routed experts (zeros without shared experts)."""
        return self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)

    def run(self, x: torch.Tensor, experts: RoutedExperts, tag: int) -> Pass:
        """Dispatches, computes the shared part while the expert ranks work, yields, then combines."""
        ids, weights = self.route(x)
        sent = experts.dispatch(self.moe_index, x, ids, weights, tag)
        out = self.shared(x)
        yield
        return experts.combine(sent, out)


class SparseMoE(MoEBlock):
    """Mixtral / Qwen3-MoE: `mlp.gate.weight` and routed experts only."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__(config, moe_index)
        self.gate = MoEGate(config)

    @property
    def gate_module(self) -> MoEGate:
        return self.gate


def feed_forward(mlp: nn.Module, x: torch.Tensor, experts: RoutedExperts, tag: int) -> Pass:
    """The MLP of a decoder layer, routed (yielding once) or dense."""
    if isinstance(mlp, MoEBlock):
        return (yield from mlp.run(x, experts, tag))
    return mlp(x)


class PreNormDecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): Llama's layer, as Mixtral and Qwen3-MoE use it."""

    def __init__(self, config: ModelConfig, attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run(self, x, rope: Rope, cache: KVCache, batch: AttentionBatch, experts: RoutedExperts, tag: int):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, batch)
        h = yield from feed_forward(self.mlp, self.post_attention_layernorm(x), experts, tag)
        return x + h


def moe_indices(config: ModelConfig) -> dict[int, int]:
    """Decoder layer -> its ordinal among the MoE layers (the expert shards' layer index)."""
    return {layer: i for i, layer in enumerate(config.moe_layers)}


def layer_mlp(
    config: ModelConfig, layer: int, moe_block: Callable[[ModelConfig, int], nn.Module]
) -> nn.Module:
    """Decoder layer `layer`'s MLP: the family's routed block where the layer is a MoE layer (built with
    its MoE ordinal), else the dense SwiGLU MLP."""
    moe = moe_indices(config)
    if layer in moe:
        return moe_block(config, moe[layer])
    return MLP(config.hidden_size, config.intermediate_size)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class RouterModel(nn.Module):
    """A causal LM without its routed experts: embeddings, decoder layers, final norm and head.

    Parameter names mirror the Hugging Face checkpoint, so loading is a name-for-name copy. An adapter
    subclasses it with `make_layer` and, where the family scales its embeddings, `embed_scale`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config, [self.make_layer(config, i) for i in range(config.num_hidden_layers)])
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        inv_freq, self.rope_scale = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def make_layer(self, config: ModelConfig, layer: int) -> nn.Module:
        raise NotImplementedError

    def embed_scale(self) -> float | None:
        return None

    def init_buffers(self, device: torch.device) -> None:
        """Non-persistent buffers, recomputed on `device` after a load from the meta device."""
        self.inv_freq = rope_frequencies(self.config, device)[0]

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.rope_scale == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def forward(
        self,
        token_ids: torch.Tensor,
        batch: AttentionBatch,
        cache: KVCache,
        experts: RoutedExperts,
        logits_index: torch.Tensor,
    ) -> torch.Tensor:
        """The step's flat tokens through every layer; fp32 logits of the rows in logits_index."""
        return self.forward_micro_batches([MicroBatch(token_ids, batch, logits_index)], cache, experts)[0]

    def forward_micro_batches(
        self, micro_batches: list[MicroBatch], cache: KVCache, experts: RoutedExperts
    ) -> list[torch.Tensor]:
        """Each micro-batch's logits; their passes take turns at every MoE layer."""
        return interleave([self._pass(mb, tag, cache, experts) for tag, mb in enumerate(micro_batches)])

    def _pass(self, mb: MicroBatch, tag: int, cache: KVCache, experts: RoutedExperts) -> Pass:
        x = self.model.embed_tokens(mb.token_ids)
        scale = self.embed_scale()
        if scale is not None:
            x = x * scale
        rope = self.rope(mb.batch.positions, x.dtype)
        for layer in self.model.layers:
            x = yield from layer.run(x, rope, cache, mb.batch, experts, tag)
        x = self.model.norm(x.index_select(0, mb.logits_index))
        if self.lm_head is None:
            return F.linear(x, self.model.embed_tokens.weight).float()
        return self.lm_head(x).float()
