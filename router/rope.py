"""Which rope a config asks for: the default one or YaRN, read as transformers reads it (torch-free;
the frequencies are router/layers.py rope_frequencies).

A config names its rope in `rope_parameters` (transformers 5) or the legacy `rope_scaling` (what
published checkpoints such as gpt-oss still carry); any other type is a load error naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ROPE_TYPES = ("default", "yarn")
# (config key, how an error names its type); the first that sets a type other than default is the rope
SECTIONS = (("rope_parameters", "rope_parameters.rope_type"), ("rope_scaling", "rope_scaling type"))


class RopeError(ValueError):
    """A rope type the engine does not implement; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """The YaRN fields are read only for rope_type 'yarn'."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def yarn_scale(self) -> float:
        """The factor cos and sin are multiplied by (keeps the attention entropy at long range)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _mscale(self.factor, self.mscale) / _mscale(self.factor, self.mscale_all_dim)
        return _mscale(self.factor)

    def softmax_mscale(self) -> float:
        """DeepSeek-V3's extra factor on its softmax scale (transformers' `yarn_apply_mscale`); it
        applies whenever the rope is scaled and mscale_all_dim is set, whatever yarn_scale is."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        return _mscale(self.factor, self.mscale_all_dim) ** 2

    def yarn_ramp(self, dim: int, base: float) -> tuple[float, float]:
        """The frequency indices between which YaRN blends interpolated into original frequencies."""

        def correction_dim(rotations: float) -> float:
            wavelength_ratio = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return dim * math.log(wavelength_ratio) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        return low, high + 0.001 if low == high else high  # the reference's zero-width guard


def parse_rope(raw: dict[str, Any], max_position_embeddings: int) -> RopeScaling:
    """The RopeScaling of a config.json dict."""
    sections = []
    for key, field in SECTIONS:
        params = raw.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise RopeError(f"{field} {kind!r} is not supported (only {', '.join(map(repr, ROPE_TYPES))})")
        if kind != "default":
            sections.append((kind, params))
    if not sections:
        return RopeScaling()
    kind, params = sections[0]
    original = (
        params.get("original_max_position_embeddings")
        or raw.get("original_max_position_embeddings")
        or max_position_embeddings  # transformers' default too
    )
    return RopeScaling(
        rope_type=kind,
        factor=float(params.get("factor") or max_position_embeddings / original),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
        attention_factor=_optional_float(params.get("attention_factor")),
        mscale=_optional_float(params.get("mscale")),
        mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
    )


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
