"""One shard's routed experts: loading them from a checkpoint and their SwiGLU compute."""

import torch
import torch.nn.functional as F

from experts.checkpoint import CheckpointReader
from experts.layouts import expert_dims, load_layer


class ExpertShard:
    """The routed experts one shard owns, for every MoE layer, and their SwiGLU compute."""

    def __init__(
        self, gate_up: list[torch.Tensor], down: list[torch.Tensor], grouped: bool | None = None
    ) -> None:
        """Per MoE layer (list index = MoE layer ordinal): gate_up [E_local, 2*I, H], whose first I output
        rows are gate_proj and next I up_proj, and down [E_local, H, I]."""
        if not gate_up or len(gate_up) != len(down):
            raise ValueError(
                f"need one gate_up and one down per MoE layer, got {len(gate_up)} and {len(down)}"
            )
        num_local, two_i, hidden = gate_up[0].shape
        if two_i % 2:
            raise ValueError(f"gate_up output size {two_i} is not even")
        for layer, (gu, dn) in enumerate(zip(gate_up, down, strict=True)):
            if gu.shape != (num_local, two_i, hidden) or dn.shape != (num_local, hidden, two_i // 2):
                raise ValueError(
                    f"MoE layer {layer}: gate_up {tuple(gu.shape)} and down {tuple(dn.shape)} do not match "
                    f"gate_up ({num_local}, {two_i}, {hidden}) and down ({num_local}, {hidden}, {two_i // 2})"
                )
        self.gate_up = gate_up
        self.down = down
        self.num_layers = len(gate_up)
        self.num_local_experts = num_local
        self.hidden_size = hidden
        self.intermediate_size = two_i // 2
        # None: grouped GEMM where it is fast (see grouped_mm_supported); True forces it (CPU tests).
        self.grouped = (
            grouped_mm_supported(gate_up[0].device, gate_up[0].dtype) if grouped is None else grouped
        )

    @classmethod
    def load(
        cls, reader: CheckpointReader, layers: list[int], expert_ids: list[int], dtype: torch.dtype
    ) -> "ExpertShard":
        """Load experts `expert_ids` (global ids, in local order) of decoder layers `layers` (the MoE
        layers, in order), reading only those experts' tensors, straight into `dtype` buffers.

        Each layer in whichever layout the checkpoint holds it (experts/layouts.py).
        """
        if not layers or not expert_ids:
            raise ValueError(
                f"need at least one layer and one expert, got layers={layers} experts={expert_ids}"
            )
        inter, hidden = expert_dims(reader, layers[0], expert_ids[0])
        gate_up, down = [], []
        for layer in layers:
            gu = torch.empty(len(expert_ids), 2 * inter, hidden, dtype=dtype)
            dn = torch.empty(len(expert_ids), hidden, inter, dtype=dtype)
            load_layer(reader, layer, expert_ids, gu, dn)
            gate_up.append(gu)
            down.append(dn)
        return cls(gate_up, down)

    def reslot(
        self,
        reader: CheckpointReader,
        layers: list[int],
        held: list[int],
        expert_ids: list[int],
    ) -> tuple["ExpertShard", int]:
        """A new shard with experts `expert_ids` in its slots, built beside this one (which holds `held`,
        and is not written): an expert it holds is copied, the others are read from the checkpoint.
        Returns it and the bytes read from the checkpoint."""
        where = {expert: slot for slot, expert in enumerate(held)}
        new = [e for e in expert_ids if e not in where]
        fresh = ExpertShard.load(reader, layers, new, self.gate_up[0].dtype) if new else None
        source = [where.get(e, -1) for e in expert_ids]
        fresh_slot = {e: i for i, e in enumerate(new)}
        gate_up, down = [], []
        for layer in range(self.num_layers):
            parts_gu, parts_dn = [], []
            for expert, slot in zip(expert_ids, source, strict=True):
                if slot >= 0:
                    parts_gu.append(self.gate_up[layer][slot])
                    parts_dn.append(self.down[layer][slot])
                else:
                    parts_gu.append(fresh.gate_up[layer][fresh_slot[expert]].to(self.gate_up[0].device))
                    parts_dn.append(fresh.down[layer][fresh_slot[expert]].to(self.gate_up[0].device))
            gate_up.append(torch.stack(parts_gu))
            down.append(torch.stack(parts_dn))
        return ExpertShard(gate_up, down, self.grouped), fresh.nbytes() if fresh else 0

    def to(self, device: torch.device) -> "ExpertShard":
        return ExpertShard([t.to(device) for t in self.gate_up], [t.to(device) for t in self.down])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down))

    def forward(
        self, layer: int, rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """rows [R, H] in the weights' dtype; local_ids [R, k] int64, -1 for an empty slot; weights [R, k].

        Returns [R, H] in rows.dtype: per row, the sum over its valid slots of
        weight * down(silu(gate(x)) * up(x)).
        """
        gate_up, down = self.gate_up[layer], self.down[layer]
        out = torch.zeros_like(rows)
        flat_ids = local_ids.reshape(-1)
        pairs = (flat_ids >= 0).nonzero().squeeze(1)
        if pairs.numel() == 0:
            return out
        order = torch.argsort(flat_ids[pairs], stable=True)
        pairs = pairs[order]
        counts = torch.bincount(flat_ids[pairs], minlength=self.num_local_experts)
        if counts.numel() > self.num_local_experts:
            raise ValueError(
                f"local expert id {counts.numel() - 1} >= {self.num_local_experts} local experts"
            )
        tokens = pairs // local_ids.shape[1]
        x = rows[tokens]
        if self.grouped:
            y = _grouped_swiglu(x, gate_up, down, counts)
        else:
            y = _looped_swiglu(x, gate_up, down, counts.tolist())
        y *= weights.reshape(-1)[pairs].to(y.dtype).unsqueeze(1)
        return out.index_add_(0, tokens, y)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm is fast on Hopper-class GPUs (sm90+) in bf16, and on CPU it beats one GEMM chain
    per expert by 10-20 % from 16 tokens up, fp32 and bf16 (benchmarks/results/expert_compute.json)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


def _grouped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor):
    """All local experts in two grouped GEMMs over rows sorted by expert; no host sync on the counts."""
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offsets)


def _looped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]):
    """One GEMM pair per active expert over its contiguous block of rows."""
    y = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        end = start + count
        gate, up = F.linear(x[start:end], gate_up[expert]).chunk(2, dim=-1)
        y[start:end] = F.linear(F.silu(gate) * up, down[expert])
        start = end
    return y
