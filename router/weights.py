"""Builds the router model from a checkpoint without ever touching the routed experts' tensors."""

from __future__ import annotations

import torch
from torch import nn

from experts.checkpoint import CheckpointError, CheckpointReader
from experts.gemm_layout import in_gemm_layout
from experts.kind import ExpertKind
from router.config import ModelConfig, adapter
from router.decode_linear import use_decode_linears
from router.layers import RouterModel

# the gates read fp32 states
FP32_PARAMS = (
    "norm.weight",
    ".gate.weight",
    "expert_bias",
    "e_score_correction_bias",
    "mlp.router.weight",
    "mlp.router.bias",
)


def load_router_model(
    reader: CheckpointReader, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> RouterModel:
    """The config's architecture adapter's model, every tensor checked against the checkpoint's, every
    Linear's weight in the memory order its GEMM reads fastest (experts/gemm_layout.py), and small
    batches on the CPU's decode kernel where it applies (router/decode_linear.py)."""
    family = adapter(config.architecture)
    with torch.device("meta"):
        model = family.Model(config)
    aliases = getattr(family, "CHECKPOINT_ALIASES", ())
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    state = {}
    for name, param in model.state_dict().items():
        stored = _stored_name(reader, name, aliases)
        found = reader.shape(stored)
        if tuple(found) != tuple(param.shape):
            raise CheckpointError(
                f"{reader.model_dir}: tensor {name} has shape {tuple(found)}, expected {tuple(param.shape)}"
            )
        keep_fp32 = name.endswith(FP32_PARAMS)
        tensor = reader.get(stored, torch.float32 if keep_fp32 else dtype).to(device)
        state[name] = in_gemm_layout(tensor) if name in linear else tensor
    model.load_state_dict(state, assign=True)
    model.init_buffers(device)  # built on the meta device above
    use_decode_linears(model)
    return model.eval()


def _stored_name(reader: CheckpointReader, name: str, aliases: tuple[tuple[str, str], ...]) -> str:
    """`name` as the checkpoint spells it: as is, or with one of the adapter's (ours, stored) renames."""
    for ours, stored in ((name, name), *aliases):
        candidate = name.replace(ours, stored)
        if reader.has(candidate):
            return candidate
    raise CheckpointError(f"{reader.model_dir}: missing tensor {name}")


def expert_kind(config: ModelConfig) -> ExpertKind:
    """What the config's routed experts compute and how its checkpoint stores them, for ExpertShard.load."""
    return ExpertKind(
        activation=config.expert_activation,
        alpha=config.swiglu_alpha,
        limit=config.swiglu_limit,
        biases=config.expert_biases,
        interleaved=config.experts_interleaved,
    )
