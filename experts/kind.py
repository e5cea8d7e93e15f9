"""What a family's routed experts compute and how its checkpoint stores them.

The model's adapter sets it (router ModelConfig.experts); whoever builds an ExpertShard passes it on,
so nothing here depends on the router.
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATIONS = ("swiglu", "clamped_swiglu")


@dataclass(frozen=True)
class ExpertKind:
    # "swiglu": silu(gate) * up. "clamped_swiglu" (GPT-OSS): gate clamped above and up on both sides
    # at `limit`, then (up + 1) * gate * sigmoid(alpha * gate).
    activation: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    biases: bool = False  # gate_up_proj_bias [E, 2I] and down_proj_bias [E, H] beside the weights
    # fused gate_up [E, H, 2I] with gate and up in alternating columns and down [E, I, H] (GPT-OSS),
    # instead of gate_up [E, 2I, H] with the gate rows first and down [E, H, I]
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            known = ", ".join(ACTIVATIONS)
            raise ValueError(f"unknown expert activation {self.activation!r}; known: {known}")
