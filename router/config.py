"""The model architecture as read from a checkpoint's config.json.

The fields every family shares are read here; each architecture's adapter module (ADAPTERS) reads its
own (`parse_config`) and names its router model class (`Model`). A field the engine would not honour
(a quantised format, a rope scaling it does not implement, ...) is a load error naming the field.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from router.rope import RopeError, RopeScaling, parse_rope

ADAPTERS = {
    "AfmoeForCausalLM": "router.afmoe",
    "DeepseekV3ForCausalLM": "router.deepseek_v3",
    "GptOssForCausalLM": "router.gpt_oss",
    "MixtralForCausalLM": "router.mixtral",
    "Qwen3MoeForCausalLM": "router.qwen3_moe",
}
SUPPORTED_ARCHITECTURES = tuple(ADAPTERS)
DEFAULT_ROPE = RopeScaling()


class ConfigError(ValueError):
    """A model directory whose config.json cannot be served."""


def adapter(architecture: str) -> ModuleType:
    """The module holding one architecture's `parse_config` and router `Model`."""
    return importlib.import_module(ADAPTERS[architecture])


@dataclass(frozen=True)
class ModelConfig:
    """Every field the serving path depends on, validated once at load time."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers' MLP width
    moe_intermediate_size: int  # one routed expert's width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_layer_ids: tuple[int, ...]
    layer_types: tuple[str, ...]
    sliding_window: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    gating: str
    num_dense_layers: int = 0  # AFMoE: the leading dense layers
    num_shared_experts: int = 0
    route_scale: float = 1.0
    mup_enabled: bool = False
    # DeepSeek-V3's multi-head latent attention (kv_lora_rank 0: attention with K and V per head)
    q_lora_rank: int = 0  # 0: q_proj, no low-rank query
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    n_group: int = 1  # group-limited routing: experts in n_group groups, tokens pick topk_group of them
    topk_group: int = 1
    rope: RopeScaling = DEFAULT_ROPE
    attention_bias: bool = False  # q/k/v/o projections with biases (GPT-OSS)
    attention_sinks: bool = False  # a learned per-head logit in every softmax (GPT-OSS)
    # The routed experts (experts/kind.py ExpertKind, built by router.weights.expert_kind):
    expert_activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_biases: bool = False
    experts_interleaved: bool = False

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices whose MLP is a routed MoE block, in order."""
        return list(self.moe_layer_ids)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def kv_entry_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """What one token stores in `layer`'s cache, one (heads, dim) per tensor: K and V, or for latent
        attention a single "head" of the normed latent and the rotated shared key part."""
        if self.kv_lora_rank:
            return ((1, self.kv_lora_rank + self.qk_rope_head_dim),)
        return ((self.num_key_value_heads, self.head_dim),) * 2

    def kv_bytes_per_token_layer(self, itemsize: int, layer: int = 0) -> int:
        """The cache entry of one token in one layer."""
        return itemsize * sum(math.prod(shape) for shape in self.kv_entry_shapes(layer))

    def kv_bytes_per_sequence(self, max_model_len: int, block_size: int, itemsize: int) -> int:
        """KV bytes one sequence reserves in the paged cache: full layers hold max_model_len tokens,
        sliding layers a ring of window-1, both in whole blocks, each layer at its own entry size."""
        full_tokens = -(-max_model_len // block_size) * block_size
        ring_tokens = -(-max(self.sliding_window - 1, 1) // block_size) * block_size
        return sum(
            (ring_tokens if self.is_sliding(i) else full_tokens) * self.kv_bytes_per_token_layer(itemsize, i)
            for i in range(self.num_hidden_layers)
        )

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
        known = [a for a in archs if a in ADAPTERS]
        if not known:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return adapter(known[0]).parse_config(RawConfig(raw, source))


class RawConfig:
    """A config.json being read: required fields, the checks every family shares, the common fields."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {message}")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        if self.raw.get(key) is None:
            self.fail(f"missing required field {key!r}")
        return self.raw[key]

    def refuse_if_set(self, key: str, why: str) -> None:
        if self.raw.get(key):
            self.fail(f"{key}={self.raw[key]!r} is not supported: {why}")

    def _check_common(self, family: dict[str, Any]) -> None:
        self.refuse_if_set("quantization_config", "only unquantised checkpoints are read")
        if not family.get("attention_bias"):
            self.refuse_if_set("attention_bias", "attention projections without biases only")
        rope = self.raw.get("rope_parameters") or {}
        if float(rope.get("partial_rotary_factor") or 1.0) != 1.0:
            self.fail("rope_parameters.partial_rotary_factor is not supported (rope on the whole head only)")
        if self.get("hidden_act", "silu") != "silu":
            self.fail(f"hidden_act {self.raw['hidden_act']!r} is not supported (only 'silu')")

    def build(self, **family: Any) -> ModelConfig:
        """The ModelConfig of the shared fields read here and the family's own `family` fields."""
        self._check_common(family)
        heads = int(self.need("num_attention_heads"))
        hidden = int(self.need("hidden_size"))
        kv_heads = int(self.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            self.fail(f"num_attention_heads {heads} not divisible by num_key_value_heads")
        eos = self.raw.get("eos_token_id")
        rope = self.raw.get("rope_parameters") or {}
        max_positions = int(self.get("max_position_embeddings") or 4096)
        try:
            scaling = parse_rope(self.raw, max_positions)
        except RopeError as err:
            self.fail(str(err))
        common = dict(
            vocab_size=int(self.need("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(self.need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(self.get("head_dim") or hidden // heads),
            num_experts_per_tok=int(self.need("num_experts_per_tok")),
            sliding_window=int(self.get("sliding_window") or 0),
            rope_theta=float(rope.get("rope_theta") or self.get("rope_theta") or 10000.0),
            rms_norm_eps=float(self.get("rms_norm_eps") or 1e-5),
            tie_word_embeddings=bool(self.raw.get("tie_word_embeddings")),
            max_position_embeddings=max_positions,
            rope=scaling,
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        )
        cfg = ModelConfig(**(common | family))
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
            self.fail("num_experts_per_tok must be within 1..num_experts")
        if "sliding_attention" in cfg.layer_types and cfg.sliding_window < 1:
            self.fail("sliding layers need sliding_window >= 1")
        return cfg
