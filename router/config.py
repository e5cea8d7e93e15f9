"""The model architecture as read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("AfmoeForCausalLM",)
LAYER_TYPES = ("sliding_attention", "full_attention")


class ConfigError(ValueError):
    """A model directory whose config.json cannot be served."""


@dataclass(frozen=True)
class ModelConfig:
    """Every AFMoE field the serving path depends on, validated once at load time."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_dense_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    route_scale: float
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_theta: float
    rms_norm_eps: float
    mup_enabled: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    gating: str = "afmoe_sigmoid"

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices whose MLP is a routed MoE block, in order."""
        return list(range(self.num_dense_layers, self.num_hidden_layers))

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def kv_bytes_per_token_layer(self, itemsize: int) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_key_value_heads * self.head_dim * itemsize

    def kv_slots_per_sequence(self, max_model_len: int, block_size: int) -> int:
        """(token, layer) KV slots one sequence reserves in the paged cache: full layers hold
        max_model_len tokens, sliding layers a ring of window-1, both in whole blocks."""
        sliding = sum(self.is_sliding(i) for i in range(self.num_hidden_layers))
        full_tokens = -(-max_model_len // block_size) * block_size
        ring_tokens = -(-max(self.sliding_window - 1, 1) // block_size) * block_size
        return (self.num_hidden_layers - sliding) * full_tokens + sliding * ring_tokens

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ConfigError(f"{model_dir} has no config.json: not a Hugging Face model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"{source}: missing required field {key!r}")
            return raw[key]

        layers = int(need("num_hidden_layers"))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        layer_types = raw.get("layer_types")
        if layer_types is None:
            every = int(raw.get("global_attn_every_n_layers") or 4)
            layer_types = [
                "sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)
            ]
        if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
            raise ConfigError(f"{source}: layer_types must list {layers} entries from {LAYER_TYPES}")
        rope = raw.get("rope_parameters") or {"rope_type": "default", "rope_theta": raw.get("rope_theta")}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default')")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads {heads} not divisible by num_key_value_heads")
        cfg = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            num_hidden_layers=layers,
            num_dense_layers=int(raw.get("num_dense_layers") or 0),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(need("num_experts")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            num_shared_experts=int(raw.get("num_shared_experts") or 0),
            route_scale=float(raw.get("route_scale") or 1.0),
            layer_types=tuple(layer_types),
            sliding_window=int(raw.get("sliding_window") or 0),
            rope_theta=float(rope.get("rope_theta") or 10000.0),
            rms_norm_eps=float(raw.get("rms_norm_eps") or 1e-5),
            mup_enabled=bool(raw.get("mup_enabled")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings")),
            max_position_embeddings=int(raw.get("max_position_embeddings") or 4096),
            eos_token_ids=eos_ids,
        )
        if not 0 <= cfg.num_dense_layers <= layers:
            raise ConfigError(f"{source}: num_dense_layers must be within 0..{layers}")
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            raise ConfigError(f"{source}: num_experts_per_tok must be within 1..num_experts")
        if "sliding_attention" in cfg.layer_types and cfg.sliding_window < 1:
            raise ConfigError(f"{source}: sliding layers need sliding_window >= 1")
        return cfg
