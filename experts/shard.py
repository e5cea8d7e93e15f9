"""One shard's routed experts: loading them from a checkpoint, and their (clamped) SwiGLU compute."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from experts.checkpoint import CheckpointReader
from experts.gemm_layout import empty_weights, in_gemm_layout, reads_transposed
from experts.gemv_kernel import MAX_ROWS_PER_MATRIX, load_gemv
from experts.kind import ExpertKind
from experts.layouts import expert_dims, load_layer

PLAIN = ExpertKind()

# On the CPU, torch._grouped_mm steps through every local expert, active or not, so with few active it
# loses to one GEMM pair per active expert. 64 experts, fp32 ([in, out] memory), p50: 4 active (1 token)
# 392-442 us looped against 469-471 grouped, 8 active 732-767 against 758-793, 14-15 active about even
# (benchmarks/results/expert_compute-20261203T164541Z.json, -164603Z.json).
CPU_LOOP_MAX_ACTIVE_SHARE = 1 / 6
KERNELS = ("loop", "grouped_mm", "gemv")


class ExpertShard:
    """The routed experts one shard owns, for every MoE layer, and their compute (experts/kind.py)."""

    def __init__(
        self,
        gate_up: list[torch.Tensor],
        down: list[torch.Tensor],
        kernel: str | None = None,
        *,
        kind: ExpertKind = PLAIN,
        gate_up_bias: list[torch.Tensor] | None = None,
        down_bias: list[torch.Tensor] | None = None,
    ) -> None:
        """Per MoE layer (list index = MoE layer ordinal): gate_up [E_local, 2*I, H], whose first I output
        rows are gate_proj and next I up_proj, and down [E_local, H, I]; with `kind.biases`, also
        gate_up_bias [E_local, 2*I] (gate first) and down_bias [E_local, H]. `kernel` forces one of
        KERNELS; None chooses per call (kernel_for)."""
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
        if kernel not in (None, *KERNELS):
            raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
        if kind.biases != (gate_up_bias is not None and down_bias is not None):
            raise ValueError(f"{kind} needs gate_up_bias and down_bias exactly when it has biases")
        for layer, (gb, db) in enumerate(zip(gate_up_bias or [], down_bias or [], strict=True)):
            if gb.shape != (num_local, two_i) or db.shape != (num_local, hidden):
                raise ValueError(
                    f"MoE layer {layer}: biases {tuple(gb.shape)} and {tuple(db.shape)} do not match "
                    f"({num_local}, {two_i}) and ({num_local}, {hidden})"
                )
        self.gate_up = [in_gemm_layout(t) for t in gate_up]
        self.down = [in_gemm_layout(t) for t in down]
        self.kind = kind
        self.gate_up_bias, self.down_bias = gate_up_bias, down_bias
        self.activate = activation(kind)
        self.num_layers = len(gate_up)
        self.num_local_experts = num_local
        self.hidden_size = hidden
        self.intermediate_size = two_i // 2
        self.forced = kernel
        device, dtype = self.gate_up[0].device, self.gate_up[0].dtype
        self.grouped = grouped_mm_supported(device, dtype)
        self.gemv = None
        plain_swiglu = kind.activation == "swiglu" and not kind.biases
        if kernel in (None, "gemv") and plain_swiglu and reads_transposed(device, dtype):
            self.gemv = load_gemv()
        if kernel == "gemv" and self.gemv is None:
            raise ValueError(f"the gemv kernel is not available for {dtype} {kind} experts on {device}")

    @classmethod
    def load(
        cls,
        reader: CheckpointReader,
        layers: list[int],
        slots: list[list[int]],
        dtype: torch.dtype,
        kind: ExpertKind = PLAIN,
    ) -> "ExpertShard":
        """Load, for each of decoder layers `layers` (the MoE layers, in order), the experts of its slots
        (`slots[i]`: global ids in slot order, as many on every layer), reading only those experts'
        tensors, straight into `dtype` buffers.

        Each layer in whichever layout the checkpoint holds it (experts/layouts.py); `kind` says what
        the family's experts compute and whether they are stored interleaved, with biases.
        """
        if not layers or len(slots) != len(layers) or not slots[0]:
            raise ValueError(f"need one non-empty slot list per layer, got layers={layers} slots={slots}")
        if any(len(ids) != len(slots[0]) for ids in slots):
            raise ValueError(f"every layer needs as many slots, got {[len(ids) for ids in slots]}")
        inter, hidden = expert_dims(reader, layers[0], slots[0][0], kind.interleaved)
        num = len(slots[0])
        gate_up, down, gate_up_bias, down_bias = [], [], [], []
        for layer, expert_ids in zip(layers, slots, strict=True):
            gu = empty_weights(num, 2 * inter, hidden, dtype)
            dn = empty_weights(num, hidden, inter, dtype)
            biases = None
            if kind.biases:
                biases = torch.empty(num, 2 * inter, dtype=dtype), torch.empty(num, hidden, dtype=dtype)
                gate_up_bias.append(biases[0])
                down_bias.append(biases[1])
            load_layer(reader, layer, expert_ids, gu, dn, kind.interleaved, biases)
            gate_up.append(gu)
            down.append(dn)
        if not kind.biases:
            return cls(gate_up, down, kind=kind)
        return cls(gate_up, down, kind=kind, gate_up_bias=gate_up_bias, down_bias=down_bias)

    def reslot(
        self,
        reader: CheckpointReader,
        layers: list[int],
        held: list[list[int]],
        slots: list[list[int]],
    ) -> tuple["ExpertShard", int]:
        """A new shard with, per MoE layer, experts `slots[i]` in its slots, built beside this one (which
        holds `held[i]`, and is not written): an expert the layer holds is copied, the others are read
        from the checkpoint. Returns it and the bytes read from the checkpoint."""
        dtype, device = self.gate_up[0].dtype, self.gate_up[0].device
        names = ("gate_up", "down", "gate_up_bias", "down_bias")
        built: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        read = 0
        for i, (layer, ids) in enumerate(zip(layers, slots, strict=True)):
            where = {expert: slot for slot, expert in enumerate(held[i])}
            new = [e for e in ids if e not in where]
            fresh = ExpertShard.load(reader, [layer], [new], dtype, self.kind).to(device) if new else None
            read += fresh.nbytes() if fresh else 0
            fresh_slot = {e: n for n, e in enumerate(new)}
            for name in names:
                mine = getattr(self, name)
                if mine is not None:
                    theirs = getattr(fresh, name)[0] if fresh else None
                    stacked = torch.stack(
                        [mine[i][where[e]] if e in where else theirs[fresh_slot[e]] for e in ids]
                    )
                    built[name].append(in_gemm_layout(stacked) if stacked.dim() == 3 else stacked)
        shard = ExpertShard(
            built["gate_up"],
            built["down"],
            self.forced,
            kind=self.kind,
            gate_up_bias=built["gate_up_bias"] or None,
            down_bias=built["down_bias"] or None,
        )
        return shard, read

    def to(self, device: torch.device) -> "ExpertShard":
        def moved(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if tensors is None else [t.to(device) for t in tensors]

        return ExpertShard(
            [in_gemm_layout(t, device) for t in self.gate_up],
            [in_gemm_layout(t, device) for t in self.down],
            kind=self.kind,
            gate_up_bias=moved(self.gate_up_bias),
            down_bias=moved(self.down_bias),
        )

    def nbytes(self) -> int:
        biases = (*(self.gate_up_bias or ()), *(self.down_bias or ()))
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down, *biases))

    def forward(
        self, layer: int, rows: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """rows [R, H] in the weights' dtype; local_ids [R, k] int64, -1 for an empty slot; weights [R, k].

        Returns [R, H] in rows.dtype: per row, the sum over its valid slots of
        weight * down(act(gate(x), up(x))), act the kind's activation (silu(gate) * up for SwiGLU).
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
        x = rows.index_select(0, tokens)  # not rows[tokens]: several times slower on the CPU
        row_bias = None
        if self.gate_up_bias is not None:
            row_experts = flat_ids[pairs]
            row_bias = self.gate_up_bias[layer][row_experts], self.down_bias[layer][row_experts]
        kernel = self.kernel_for(counts)
        if kernel == "gemv":
            y = self.gemv.swiglu_experts(x, gate_up, down, counts)
        elif kernel == "grouped_mm":
            y = _grouped_experts(x, gate_up, down, counts, self.activate, row_bias)
        else:
            y = _looped_experts(x, gate_up, down, counts.tolist(), self.activate, row_bias)
        y *= weights.reshape(-1)[pairs].to(y.dtype).unsqueeze(1)
        return out.index_add_(0, tokens, y)

    def kernel_for(self, counts: torch.Tensor) -> str:
        """One of KERNELS for a call whose local experts get `counts` rows each."""
        if self.forced is not None:
            return self.forced
        if counts.device.type != "cpu":
            return "grouped_mm" if self.grouped else "loop"
        active = int(torch.count_nonzero(counts))
        if self.gemv is not None and int(counts.sum()) <= MAX_ROWS_PER_MATRIX * active:
            return "gemv"
        if self.grouped and active > CPU_LOOP_MAX_ACTIVE_SHARE * self.num_local_experts:
            return "grouped_mm"
        return "loop"


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm is fast on Hopper-class GPUs (sm90+) in bf16, and on CPU it beats one GEMM chain
    per expert by 10-20 % from 16 tokens up, fp32 and bf16 (benchmarks/results/expert_compute.json), where
    enough of the experts are active (kernel_for)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )


Activation = Callable[[torch.Tensor], torch.Tensor]
RowBias = tuple[torch.Tensor, torch.Tensor] | None  # each row's expert's gate_up and down biases


def activation(kind: ExpertKind) -> Activation:
    """[R, 2I] gate_up outputs (gate first) -> [R, I]."""
    if kind.activation == "swiglu":
        return _swiglu
    alpha, limit = kind.alpha, kind.limit

    def clamped_swiglu(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return clamped_swiglu


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _grouped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: torch.Tensor,
    activate: Activation,
    row_bias: RowBias,
) -> torch.Tensor:
    """All local experts in two grouped GEMMs over rows sorted by expert; no host sync on the counts."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offsets)
    if row_bias is not None:
        h += row_bias[0]
    y = torch._grouped_mm(activate(h), down.transpose(1, 2), offs=offsets)
    if row_bias is not None:
        y += row_bias[1]
    return y


def _looped_experts(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    counts: list[int],
    activate: Activation,
    row_bias: RowBias,
) -> torch.Tensor:
    """One GEMM pair per active expert over its contiguous block of rows."""
    y = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        end = start + count
        h = F.linear(x[start:end], gate_up[expert])
        if row_bias is not None:
            h += row_bias[0][start:end]
        y[start:end] = F.linear(activate(h), down[expert])
        if row_bias is not None:
            y[start:end] += row_bias[1][start:end]
        start = end
    return y
