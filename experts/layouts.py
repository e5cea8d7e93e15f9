"""Where a checkpoint keeps one layer's routed SwiGLU experts, in each layout transformers 5 reads.

Fused: `mlp.experts.gate_up_proj` [num_experts, 2I, H] (gate rows first) and `mlp.experts.down_proj`
[num_experts, H, I]; or, for a kind stored interleaved (GPT-OSS, the only layout save_pretrained
writes for it), gate_up_proj [num_experts, H, 2I] with gate and up in alternating columns, down_proj
[num_experts, I, H], and the biases `gate_up_proj_bias` [num_experts, 2I] (alternating too) and
`down_proj_bias` [num_experts, H]. Per expert: `mlp.experts.{E}.{gate,up,down}_proj.weight` (what
save_pretrained writes for AFMoE and Qwen3-MoE) or Mixtral's `block_sparse_moe.experts.{E}.{w1,w3,w2}.weight`
(what it writes for Mixtral). The layout is found from the names, except that the interleaved one (whose
shapes can read as the other fused one) is asked for by the caller's ExpertKind.
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


def expert_dims(
    reader: CheckpointReader, layer: int, expert: int, interleaved: bool = False
) -> tuple[int, int]:
    """(intermediate, hidden) sizes of the experts, from one of `layer`'s expert tensors."""
    fused = f"{FUSED_PREFIX.format(layer=layer)}.gate_up_proj"
    if interleaved:
        shape = reader.shape(fused)
        if len(shape) != 3 or shape[2] % 2:
            raise CheckpointError(
                f"tensor {fused} in {reader.model_dir}: expected shape (num_experts, H, 2*I), found {shape}"
            )
        return shape[2] // 2, shape[1]
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
    reader: CheckpointReader,
    layer: int,
    expert_ids: list[int],
    gate_up: torch.Tensor,
    down: torch.Tensor,
    interleaved: bool = False,
    biases: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Fills gate_up [E_local, 2I, H] and down [E_local, H, I] (and biases, gate_up's [E_local, 2I] and
    down's [E_local, H], when given) with experts `expert_ids` of `layer`, reading only their tensors
    (rows of the fused ones)."""
    prefix = FUSED_PREFIX.format(layer=layer)
    if interleaved:
        _load_interleaved(reader, prefix, expert_ids, gate_up, down)
    elif reader.has(f"{prefix}.gate_up_proj"):
        _load_fused(reader, prefix, expert_ids, gate_up, down)
    else:
        _load_per_expert(reader, _per_expert_layout(reader, layer, expert_ids[0]), expert_ids, gate_up, down)
    if biases is not None:
        _load_biases(reader, prefix, expert_ids, interleaved, *biases)


def _per_expert_layout(reader: CheckpointReader, layer: int, expert: int) -> tuple[str, tuple[str, str, str]]:
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
    _check_experts(gu_name, num_experts, expert_ids)
    reader.get_rows(gu_name, expert_ids, out=gate_up)
    reader.get_rows(dn_name, expert_ids, out=down)


def _load_interleaved(
    reader: CheckpointReader, prefix: str, expert_ids: list[int], gate_up: torch.Tensor, down: torch.Tensor
) -> None:
    gu_name, dn_name = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
    num_experts, inter, hidden = reader.shape(gu_name)[0], down.shape[2], down.shape[1]
    _check_shape(reader, gu_name, (num_experts, hidden, 2 * inter))
    _check_shape(reader, dn_name, (num_experts, inter, hidden))
    _check_experts(gu_name, num_experts, expert_ids)
    stored = reader.get_rows(gu_name, expert_ids, gate_up.dtype)
    gate_up[:, :inter] = stored[:, :, 0::2].transpose(1, 2)
    gate_up[:, inter:] = stored[:, :, 1::2].transpose(1, 2)
    down.copy_(reader.get_rows(dn_name, expert_ids, down.dtype).transpose(1, 2))


def _load_biases(
    reader: CheckpointReader,
    prefix: str,
    expert_ids: list[int],
    interleaved: bool,
    gate_up_bias: torch.Tensor,
    down_bias: torch.Tensor,
) -> None:
    gu_name, dn_name = f"{prefix}.gate_up_proj_bias", f"{prefix}.down_proj_bias"
    num_experts, inter = reader.shape(gu_name)[0], gate_up_bias.shape[1] // 2
    _check_shape(reader, gu_name, (num_experts, 2 * inter))
    _check_shape(reader, dn_name, (num_experts, down_bias.shape[1]))
    _check_experts(gu_name, num_experts, expert_ids)
    stored = reader.get_rows(gu_name, expert_ids, gate_up_bias.dtype)
    if interleaved:
        stored = torch.cat([stored[:, 0::2], stored[:, 1::2]], 1)
    gate_up_bias.copy_(stored)
    reader.get_rows(dn_name, expert_ids, out=down_bias)


def _check_experts(name: str, num_experts: int, expert_ids: list[int]) -> None:
    if max(expert_ids) >= num_experts:
        raise CheckpointError(
            f"tensor {name} holds {num_experts} experts, expert {max(expert_ids)} requested"
        )


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
