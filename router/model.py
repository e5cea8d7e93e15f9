"""AFMoE without its routed experts: everything the router computes.

Parameter names mirror the Hugging Face checkpoint (`model.layers.N.self_attn.q_proj.weight`, ...), so
loading is a name-for-name copy. Tokens of all sequences in a step are one flat [T, hidden] tensor;
only attention pads, per part of the step (see kv_cache.AttentionBatch). A step may run as two
micro-batches whose passes take turns at every MoE layer (router/micro_batch.py); the layers are
generators for that, yielding once per MoE layer between dispatch and combine. Timing is not done
here: whoever wants it hooks the Attention and MoEGate modules (router/step_stats.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from router.config import ModelConfig
from router.exchange import RoutedExperts
from router.gating import GATING
from router.kv_cache import AttentionBatch, KVCache
from router.micro_batch import MicroBatch, Pass, interleave


class RMSNorm(nn.Module):
    """Computed in fp32 with an fp32 weight, as the reference keeps these modules in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    exponent = torch.arange(0, config.head_dim, 2, dtype=torch.float32, device=device) / config.head_dim
    return 1.0 / (config.rope_theta**exponent)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        hidden, heads, kv_heads, dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim
        self.sliding = config.is_sliding(layer)
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, heads * dim, bias=False)
        self.q_norm = RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, batch: AttentionBatch
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(tokens, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(tokens, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        if self.sliding:  # global layers carry no positional encoding
            cos, sin = rope
            q = q * cos[:, None] + rotate_half(q) * sin[:, None]
            k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        out = self._attend(q, k, v, cache, batch)
        out = out.reshape(tokens, -1) * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(out)

    def _attend(self, q, k, v, cache: KVCache, batch: AttentionBatch) -> torch.Tensor:
        group = cache.group_of[self.layer]
        k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
        out = torch.empty_like(q)
        for part in batch.parts:
            index = part.groups[group]
            rows = part.batch * part.max_query

            def grid(t: torch.Tensor, part=part, rows=rows) -> torch.Tensor:
                padded = t.new_zeros(rows, *t.shape[1:])
                padded[part.grid_index] = t[part.tokens]
                return padded.view(part.batch, part.max_query, *t.shape[1:])

            keys = torch.cat([k_cache[index.cached_slots], grid(k)], 1).transpose(1, 2)
            values = torch.cat([v_cache[index.cached_slots], grid(v)], 1).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                grid(q).transpose(1, 2),
                keys,
                values,
                attn_mask=index.mask,
                scale=self.head_dim**-0.5,
                enable_gqa=self.heads != self.kv_heads,
            )
            out[part.tokens] = attended.transpose(1, 2).reshape(rows, self.heads, self.head_dim)[
                part.grid_index
            ]
        for part in batch.parts:
            index = part.groups[group]
            k_cache[index.write_slots] = k[index.write_tokens]
            v_cache[index.write_slots] = v[index.write_tokens]
        return out


class MoEGate(nn.Module):
    """Top-k expert ids and fp32 weights per token (a module, so that hooks can time and count it)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False, dtype=torch.float32)
        self.gating = GATING[config.gating]
        self.top_k, self.route_scale = config.num_experts_per_tok, config.route_scale

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.gate.weight)
        return self.gating(logits, expert_bias, self.top_k, self.route_scale)


class MoEBlock(nn.Module):
    """Gate and shared expert live here; the routed experts live on the expert shards."""

    def __init__(self, config: ModelConfig, moe_index: int) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.router = MoEGate(config)
        self.expert_bias = nn.Parameter(torch.zeros(config.num_experts, dtype=torch.float32))
        shared = config.moe_intermediate_size * config.num_shared_experts
        self.shared_experts = MLP(config.hidden_size, shared) if shared else None

    def run(self, x: torch.Tensor, experts: RoutedExperts, tag: int) -> Pass:
        """Dispatches, computes the shared expert while the expert ranks work, yields, then combines."""
        ids, weights = self.router(x, self.expert_bias)
        sent = experts.dispatch(self.moe_index, x, ids, weights, tag)
        out = self.shared_experts(x) if self.shared_experts is not None else torch.zeros_like(x)
        yield
        return experts.combine(sent, out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, eps)
        self.is_moe = layer >= config.num_dense_layers
        self.mlp: nn.Module = (
            MoEBlock(config, layer - config.num_dense_layers)
            if self.is_moe
            else MLP(config.hidden_size, config.intermediate_size)
        )

    def run(self, x, rope, cache: KVCache, batch: AttentionBatch, experts: RoutedExperts, tag: int) -> Pass:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, batch))
        h = self.pre_mlp_layernorm(x)
        h = (yield from self.mlp.run(h, experts, tag)) if self.is_moe else self.mlp(h)
        return x + self.post_mlp_layernorm(h)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class AfmoeRouterModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

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
        if self.config.mup_enabled:
            x = x * (self.config.hidden_size**0.5)
        rope = self.rope(mb.batch.positions, x.dtype)
        for layer in self.model.layers:
            x = yield from layer.run(x, rope, cache, mb.batch, experts, tag)
        x = self.model.norm(x[mb.logits_index])
        head = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        return F.linear(x, head).float()
