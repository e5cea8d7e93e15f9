"""Where a checkpoint keeps one layer's routed SwiGLU experts, in each layout transformers 5 reads.

Fused: `mlp.experts.gate_up_proj` [num_experts, 2I, H] (gate rows first) and `mlp.experts.down_proj`
[num_experts, H, I]. Per expert: `mlp.experts.{E}.{gate,up,down}_proj.weight` (what save_pretrained
writes for AFMoE and Qwen3-MoE) or Mixtral's `block_sparse_moe.experts.{E}.{w1,w3,w2}.weight` (what it
writes for Mixtral). The layout is found from the names, so no architecture needs naming here.
"""

from __future__ import annotations

import torch

from experts.checkpoint import CheckpointError, CheckpointReader

FUSED_PREFIX = "model.layers.{layer}.mlp.experts"
# (prefix, names of one expert's gate, up and down weights)
PER_EXPERT: tuple[tuple[str, tuple[str, str, str]], ...] = (
    ("model.layers.{layer}.mlp.experts", ("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
    ("model.layers.{layer}.block_sparse_moe.experts", ("w1.weight", "w3.weight", "w2.weight")),
)


def expert_dims(reader: CheckpointReader, layer: int, expert: int) -> tuple[int, int]:
    """(intermediate, hidden) sizes of the experts, from one of `layer`'s expert tensors."""
    fused = f"{FUSED_PREFIX.format(layer=layer)}.gate_up_proj"
    if reader.has(fused):
        shape = reader.shape(fused)
        if len(shape) != 3 or shape[1] % 2:
            raise CheckpointError(
                f"tensor {fused} in {reader.model_dir}: expected shape (num_experts, 2*I, H), found {shape}"
            )
        return shape[1] // 2, shape[2]
    prefix, (gate, _, _) = _per_expert_layout(reader, layer, expert)
    name = f"{prefix}.{expert}.{gate}"
    shape = reader.shape(name)
    if len(shape) != 2:
        raise CheckpointError(f"tensor {name} in {reader.model_dir}: expected shape (I, H), found {shape}")
    return shape[0], shape[1]


def load_layer(
    reader: CheckpointReader, layer: int, expert_ids: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> None:
    """Fills gate_up [E_local, 2I, H] and down [E_local, H, I] with experts `expert_ids` of `layer`,
    reading only their tensors (rows of the fused ones)."""
    prefix = FUSED_PREFIX.format(layer=layer)
    if reader.has(f"{prefix}.gate_up_proj"):
        _load_fused(reader, prefix, expert_ids, gate_up, down)
    else:
        _load_per_expert(reader, _per_expert_layout(reader, layer, expert_ids[0]), expert_ids, gate_up, down)


def _per_expert_layout(
    reader: CheckpointReader, layer: int, expert: int
) -> tuple[str, tuple[str, str, str]]:
    for prefix, names in PER_EXPERT:
        if reader.has(f"{prefix.format(layer=layer)}.{expert}.{names[0]}"):
            return prefix.format(layer=layer), names
    prefix, names = PER_EXPERT[0]  # none found: the error names the usual tensor
    return prefix.format(layer=layer), names


def _load_fused(
    reader: CheckpointReader, prefix: str, expert_ids: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> None:
    gu_name, dn_name = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    num_experts = reader.shape(gu_name)[0]
    _check_shape(reader, gu_name, (num_experts, *gate_up.shape[1:]))
    _check_shape(reader, dn_name, (num_experts, *down.shape[1:]))
    if max(expert_ids) >= num_experts:
        raise CheckpointError(
            f"tensor {gu_name} holds {num_experts} experts, expert {max(expert_ids)} requested"
        )
    reader.get_rows(gu_name, expert_ids, out=gate_up)
    reader.get_rows(dn_name, expert_ids, out=down)


def _load_per_expert(
    reader: CheckpointReader,
    layout: tuple[str, tuple[str, str, str]],
    expert_ids: list[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> None:
    prefix, (gate, up, dn) = layout
    inter = down.shape[2]
    for local, expert in enumerate(expert_ids):
        targets = {gate: gate_up[local, :inter], up: gate_up[local, inter:], dn: down[local]}
        for part, target in targets.items():
            name = f"{prefix}.{expert}.{part}"
            _check_shape(reader, name, tuple(target.shape))
            target.copy_(reader.get(name))


def _check_shape(reader: CheckpointReader, name: str, expected: tuple[int, ...]) -> None:
    found = reader.shape(name)
    if found != expected:
        raise CheckpointError(
            f"tensor {name} in {reader.model_dir}: expected shape {expected}, found {found}"
        )
