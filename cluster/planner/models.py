"""The models `moe-cluster plan` knows by name, and reading any other from its config.json.

Trinity Large: the numbers of issue 18 and of the model card (arcee-ai/Trinity-Large-Preview: 398B
parameters, 256 routed + 1 shared experts, top-4, 6 dense layers), matching the Trinity technical report
(arXiv 2602.17004, architecture table). Trinity Mini: that same table (32 layers of which 2 dense,
hidden 2048, FFN 6144, 32 heads x 128, 4 KV heads, window 2048, 128 experts of width 1024, top-8, route
scale 2.826) and the model card (arcee-ai/Trinity-Mini: 26B parameters, 3B active, 128k context).
Both use the Trinity tokenizer (vocab 200,192) and a full-attention layer every 4th layer; for Mini
that interleave and untied embeddings are assumptions (the report gives Large's 3:1 ratio only).
"""

from __future__ import annotations

import json
from pathlib import Path

from router.config import ConfigError, ModelConfig

_TRINITY = {
    "architectures": ["AfmoeForCausalLM"],
    "vocab_size": 200192,
    "head_dim": 128,
    "num_shared_experts": 1,
    "global_attn_every_n_layers": 4,
    "tie_word_embeddings": False,
    "mup_enabled": True,
}

BUILTIN: dict[str, dict] = {
    "trinity-large": _TRINITY
    | {
        "hidden_size": 3072,
        "intermediate_size": 12288,
        "moe_intermediate_size": 3072,
        "num_hidden_layers": 60,
        "num_dense_layers": 6,
        "num_attention_heads": 48,
        "num_key_value_heads": 8,
        "num_experts": 256,
        "num_experts_per_tok": 4,
        "route_scale": 2.448,
        "sliding_window": 4096,
        "max_position_embeddings": 262144,
    },
    "trinity-mini": _TRINITY
    | {
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 1024,
        "num_hidden_layers": 32,
        "num_dense_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "route_scale": 2.826,
        "sliding_window": 2048,
        "max_position_embeddings": 131072,
    },
}


def load_model(spec: str) -> tuple[ModelConfig, str]:
    """A built-in name, a model directory or a config.json file -> (config, where it came from)."""
    if spec.lower() in BUILTIN:
        return ModelConfig.from_dict(BUILTIN[spec.lower()], source=spec), f"built-in {spec.lower()}"
    path = Path(spec)
    if path.is_dir():
        return ModelConfig.from_model_dir(path), str(path / "config.json")
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return ModelConfig.from_dict(raw, source=str(path)), str(path)
    known = ", ".join(BUILTIN)
    raise ConfigError(
        f"--model {spec!r} is neither a built-in model ({known}) nor a directory or config file"
    )
