"""Builds the router model from a checkpoint without ever touching the routed experts' tensors."""

from __future__ import annotations

import torch

from experts.checkpoint import CheckpointError, CheckpointReader
from router.config import ModelConfig
from router.model import AfmoeRouterModel, rope_inv_freq

FP32_PARAMS = ("norm.weight", "router.gate.weight", "expert_bias")


def load_router_model(
    reader: CheckpointReader, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> AfmoeRouterModel:
    with torch.device("meta"):
        model = AfmoeRouterModel(config)
    state = {}
    for name, param in model.state_dict().items():
        if not reader.has(name):
            raise CheckpointError(f"{reader.model_dir}: missing tensor {name}")
        found = reader.shape(name)
        if tuple(found) != tuple(param.shape):
            raise CheckpointError(
                f"{reader.model_dir}: tensor {name} has shape {tuple(found)}, expected {tuple(param.shape)}"
            )
        keep_fp32 = name.endswith(FP32_PARAMS)
        state[name] = reader.get(name, torch.float32 if keep_fp32 else dtype).to(device)
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(config, device)  # built on the meta device above
    return model.eval()
