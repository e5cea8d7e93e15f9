"""Paged K/V storage and the per-step index tensors attention reads it through.

Two layer groups share one block size. Full-attention layers keep every position in a growing block
table. Sliding-window layers keep a ring of just enough blocks for window-1 past positions: older
keys are overwritten in place, so a long sequence costs them no more memory than a short one.

A sequence reserves its blocks when admitted (prompt + max new tokens), so a running sequence never
waits for memory mid-generation and nothing is ever preempted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from router.config import ModelConfig

FULL, SLIDING = "full", "sliding"


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks wanted, {len(self._free)} free")
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return taken

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


@dataclass
class SequenceBlocks:
    full: list[int]
    ring: list[int]


@dataclass
class GroupIndex:
    """Where one layer group's keys are for one part of a step."""

    cached_slots: torch.Tensor  # [B, Lc] slots of the cached keys each query may see (0 where padded)
    mask: torch.Tensor  # [B, 1, Lq, Lc + Lq] bool, True = attend
    write_tokens: torch.Tensor  # [W] step tokens whose K/V are stored
    write_slots: torch.Tensor  # [W]


@dataclass
class AttentionPart:
    """Sequences of a step padded to a common query length (decodes and prefills go in separate parts)."""

    tokens: torch.Tensor  # [Tp] indices into the step's flat token order
    grid_index: torch.Tensor  # [Tp] position of each token in the padded [B * Lq] grid
    batch: int
    max_query: int
    groups: dict[str, GroupIndex]


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T]
    parts: list[AttentionPart]


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        cache_bytes: int,
        max_num_seqs: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.window = config.sliding_window
        sliding = [i for i in range(config.num_hidden_layers) if config.is_sliding(i)]
        full = [i for i in range(config.num_hidden_layers) if not config.is_sliding(i)]
        self.ring_len = math.ceil(max(self.window - 1, 1) / block_size) if sliding else 0
        per_layer_block = 2 * block_size * config.num_key_value_heads * config.head_dim * dtype.itemsize
        ring_blocks = max_num_seqs * self.ring_len
        ring_bytes = ring_blocks * per_layer_block * len(sliding)
        if full:
            num_full = (cache_bytes - ring_bytes) // (per_layer_block * len(full))
            if num_full < 1:
                raise ValueError(
                    f"KV cache budget {cache_bytes} B is too small: sliding windows of {max_num_seqs} "
                    f"sequences take {ring_bytes} B and one full-attention block needs "
                    f"{per_layer_block * len(full)} B more"
                )
        else:
            num_full = 0
        self.full_blocks = BlockAllocator(num_full)
        self.ring_blocks = BlockAllocator(ring_blocks)
        self.has_full = bool(full)
        shape_of = {FULL: num_full * block_size, SLIDING: ring_blocks * block_size}
        kv_shape = (config.num_key_value_heads, config.head_dim)
        self.group_of = [SLIDING if config.is_sliding(i) else FULL for i in range(config.num_hidden_layers)]
        self.k = [torch.zeros(shape_of[g], *kv_shape, dtype=dtype, device=device) for g in self.group_of]
        self.v = [torch.zeros(shape_of[g], *kv_shape, dtype=dtype, device=device) for g in self.group_of]
        self.device = device
        self.nbytes = sum(t.nbytes for t in self.k + self.v)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size) if self.has_full else 0

    def can_allocate(self, num_tokens: int) -> bool:
        return (
            self.blocks_for(num_tokens) <= self.full_blocks.num_free
            and self.ring_len <= self.ring_blocks.num_free
        )

    def allocate(self, num_tokens: int) -> SequenceBlocks:
        return SequenceBlocks(
            self.full_blocks.allocate(self.blocks_for(num_tokens)), self.ring_blocks.allocate(self.ring_len)
        )

    def release(self, blocks: SequenceBlocks) -> None:
        self.full_blocks.release(blocks.full)
        self.ring_blocks.release(blocks.ring)
        blocks.full, blocks.ring = [], []

    def usage(self) -> float:
        total = self.full_blocks.num_blocks + self.ring_blocks.num_blocks
        free = self.full_blocks.num_free + self.ring_blocks.num_free
        return 1.0 - free / total if total else 0.0

    def build(self, starts: list[int], lengths: list[int], blocks: list[SequenceBlocks]) -> AttentionBatch:
        """Index tensors for a step in which sequence i computes lengths[i] tokens from starts[i]."""
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        decode = [i for i, n in enumerate(lengths) if n == 1]
        prefill = [i for i, n in enumerate(lengths) if n > 1]
        parts = [
            self._part(members, starts, lengths, blocks, offsets) for members in (decode, prefill) if members
        ]
        return AttentionBatch(positions.to(self.device), parts)

    def _part(self, members, starts, lengths, blocks, offsets) -> AttentionPart:
        dev = self.device
        start = torch.tensor([starts[i] for i in members], device=dev)
        qlen = torch.tensor([lengths[i] for i in members], device=dev)
        batch, max_q = len(members), int(qlen.max())
        steps = torch.arange(max_q, device=dev)
        valid_q = steps[None, :] < qlen[:, None]
        qpos = start[:, None] + steps[None, :]
        grid_index = valid_q.flatten().nonzero().squeeze(1)
        first = torch.tensor([offsets[i] for i in members], device=dev)
        tokens = (first[:, None] + steps[None, :]).flatten()[grid_index]
        groups = {}
        for group in set(self.group_of):
            if group == FULL:
                table = _pad_tables([blocks[i].full for i in members], dev)
                low = torch.zeros_like(start)
            else:
                table = _pad_tables([blocks[i].ring for i in members], dev)
                low = (start - (self.window - 1)).clamp(min=0)
            cached = start - low
            span = torch.arange(int(cached.max()) if batch else 0, device=dev)
            kpos_cached = low[:, None] + span[None, :]
            valid_cached = span[None, :] < cached[:, None]
            slots = self._slots(group, table, kpos_cached) * valid_cached
            kpos = torch.cat([kpos_cached, qpos], 1)
            valid_k = torch.cat([valid_cached, valid_q], 1)
            mask = valid_k[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
            if group == SLIDING:
                mask &= kpos[:, None, :] > qpos[:, :, None] - self.window
            mask |= ~valid_q[:, :, None]  # padded query rows: anything finite, their output is dropped
            keep = valid_q
            if group == SLIDING:
                keep = keep & (qpos >= (start + qlen - self.ring_len * self.block_size)[:, None])
            keep_rows, keep_steps = keep.nonzero(as_tuple=True)
            write_slots = self._slots(group, table[keep_rows], qpos[keep_rows, keep_steps][:, None])[:, 0]
            write_tokens = first[keep_rows] + keep_steps
            groups[group] = GroupIndex(slots, mask[:, None], write_tokens, write_slots)
        return AttentionPart(tokens, grid_index, batch, max_q, groups)

    def _slots(self, group: str, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        block = pos // self.block_size
        if group == SLIDING:
            block = block % self.ring_len
        return table.gather(1, block.clamp(max=table.shape[1] - 1)) * self.block_size + pos % self.block_size


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, *(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
