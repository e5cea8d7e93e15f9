"""Paged K/V storage, blocks taken as tokens are computed, and the index tensors attention reads through.

Each layer stores what ModelConfig.kv_entry_shapes names per token: K and V, or with latent attention
(DeepSeek-V3) one tensor of the latent and the shared rotated key.

Two layer groups share one block size, each with its own block pool. Full-attention layers keep every
position of a sequence. Sliding-window layers use the same position -> block table, but a block whose
positions no later query can see (all of them before num_computed - (window - 1)) is handed back to
its pool right after the step, so a long sequence holds only about a window of sliding blocks. Handed
back blocks keep their contents while free, which is what lets a later request reuse a prefix on the
sliding layers too (the rule is in router/prefix_cache.py).

The budget gives the sliding pool what max_num_seqs sequences need at once (window plus the step's
chunk) and the rest to full-attention blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from router.block_pool import BlockPool
from router.config import ModelConfig
from router.prefix_cache import longest_prefix, model_root, sliding_first_block

FULL, SLIDING = "full", "sliding"
DROPPED = -1  # a sliding-table entry whose block was handed back


@dataclass
class SequenceBlocks:
    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)  # same positions as `full`; DROPPED out of window
    dropped: int = 0  # leading sliding entries already DROPPED
    registered: int = 0  # leading blocks already offered to the prefix cache


@dataclass
class GroupIndex:
    """Where one layer group's keys are for one part of a step."""

    # [B, Lc + Lq] slots of the keys each query row may see: the cached ones, then the step's own (0 where
    # padded). Attention writes the step's keys first and then reads every key through these.
    key_slots: torch.Tensor
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
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.window = config.sliding_window
        layers = config.num_hidden_layers
        sliding = [i for i in range(layers) if config.is_sliding(i)]
        full = [i for i in range(layers) if not config.is_sliding(i)]
        self.window_blocks = math.ceil(max(self.window - 1, 1) / block_size) if sliding else 0
        block_bytes = [block_size * config.kv_bytes_per_token_layer(dtype.itemsize, i) for i in range(layers)]
        num_sliding = sliding_pool_blocks(config, max_num_seqs, block_size, max_num_batched_tokens)
        sliding_bytes = num_sliding * sum(block_bytes[i] for i in sliding)
        num_full = 0
        if full:
            full_block = sum(block_bytes[i] for i in full)
            num_full = (cache_bytes - sliding_bytes) // full_block
            if num_full < 1:
                raise ValueError(
                    f"KV cache budget {cache_bytes} B is too small: sliding windows of {max_num_seqs} "
                    f"sequences take {sliding_bytes} B and one full-attention block needs "
                    f"{full_block} B more"
                )
        self.full = BlockPool(num_full)
        self.sliding = BlockPool(num_sliding)
        self.has_full, self.has_sliding = bool(full), bool(sliding)
        self.root = model_root(repr(config))
        shape_of = {FULL: num_full * block_size, SLIDING: num_sliding * block_size}
        self.group_of = [SLIDING if config.is_sliding(i) else FULL for i in range(layers)]
        # per layer, one [slots, heads, dim] tensor per entry shape: K and V, or latent attention's one
        self.entries = [
            tuple(
                torch.zeros(shape_of[g], *shape, dtype=dtype, device=device)
                for shape in config.kv_entry_shapes(i)
            )
            for i, g in enumerate(self.group_of)
        ]
        self.device = device
        self.nbytes = sum(t.nbytes for layer in self.entries for t in layer)

    # ------------------------------------------------------------------------------------ blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Full-attention blocks of a sequence of num_tokens (what bounds its length)."""
        return math.ceil(num_tokens / self.block_size) if self.has_full else 0

    def _wanted(self, blocks: SequenceBlocks, num_tokens: int) -> tuple[int, int]:
        table = math.ceil(num_tokens / self.block_size)
        full = max(0, table - len(blocks.full)) if self.has_full else 0
        sliding = max(0, table - len(blocks.sliding)) if self.has_sliding else 0
        return full, sliding

    def can_grow(self, blocks: SequenceBlocks, num_tokens: int) -> bool:
        full, sliding = self._wanted(blocks, num_tokens)
        return full <= self.full.num_free and sliding <= self.sliding.num_free

    def grow(self, blocks: SequenceBlocks, num_tokens: int) -> None:
        """Blocks for positions up to num_tokens (those not held yet)."""
        full, sliding = self._wanted(blocks, num_tokens)
        if not self.can_grow(blocks, num_tokens):
            raise MemoryError(f"KV cache: {full} + {sliding} blocks wanted, fewer free")
        blocks.full += self.full.allocate(full)
        blocks.sliding += self.sliding.allocate(sliding)

    def trim(self, blocks: SequenceBlocks, num_computed: int) -> None:
        """Hands back the sliding blocks no query from position num_computed on can see."""
        first = sliding_first_block(num_computed, self.window, self.block_size)
        first = min(first, len(blocks.sliding))
        if first > blocks.dropped:
            self.sliding.release([b for b in blocks.sliding[blocks.dropped : first] if b != DROPPED])
            blocks.sliding[blocks.dropped : first] = [DROPPED] * (first - blocks.dropped)
            blocks.dropped = first

    def release(self, blocks: SequenceBlocks) -> None:
        """All of a sequence's blocks; the tail first, so its shared prefix stays cached longest."""
        self.full.release(blocks.full[::-1])
        self.sliding.release([b for b in blocks.sliding[::-1] if b != DROPPED])
        blocks.full, blocks.sliding, blocks.dropped, blocks.registered = [], [], 0, 0

    def usage(self) -> float:
        total = self.full.num_blocks + self.sliding.num_blocks
        return (self.full.num_used + self.sliding.num_used) / total if total else 0.0

    # ------------------------------------------------------------------------------- prefix cache

    def cached_prefix(self, hashes: list[bytes], num_tokens: int) -> int:
        """Tokens of the longest reusable cached prefix of a sequence of num_tokens with these hashes."""
        limit = (num_tokens - 1) // self.block_size
        full = self.full if self.has_full else None
        sliding = self.sliding if self.has_sliding else None
        return longest_prefix(hashes, limit, full, sliding, self.window, self.block_size) * self.block_size

    def attach_prefix(self, hashes: list[bytes], num_tokens: int) -> SequenceBlocks:
        """A new sequence's blocks, starting with references to the first num_tokens' cached blocks."""
        n = num_tokens // self.block_size
        blocks = SequenceBlocks(registered=n)
        if self.has_full:
            blocks.full = [self.full.cached(h) for h in hashes[:n]]
            self.full.touch(blocks.full)
        if self.has_sliding:
            first = sliding_first_block(num_tokens, self.window, self.block_size)
            kept = [self.sliding.cached(h) for h in hashes[first:n]]
            self.sliding.touch(kept)
            blocks.sliding, blocks.dropped = [DROPPED] * first + kept, first
        return blocks

    def register(self, blocks: SequenceBlocks, hashes: list[bytes]) -> None:
        """Offers the sequence's newly filled blocks (one per hash) to the prefix cache."""
        for b in range(blocks.registered, len(hashes)):
            if self.has_full:
                self.full.register(blocks.full[b], hashes[b])
            if self.has_sliding and blocks.sliding[b] != DROPPED:
                self.sliding.register(blocks.sliding[b], hashes[b])
        blocks.registered = max(blocks.registered, len(hashes))

    # ------------------------------------------------------------------------------------- build

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
        rows, cols = valid_q.nonzero(as_tuple=True)
        write_tokens = first[rows] + cols
        groups = {}
        for group in set(self.group_of):
            if group == FULL:
                table = _pad_tables([blocks[i].full for i in members], dev)
                low = torch.zeros_like(start)
            else:
                table = _pad_tables([blocks[i].sliding for i in members], dev)
                low = (start - (self.window - 1)).clamp(min=0)
            cached = start - low
            span = torch.arange(int(cached.max()) if batch else 0, device=dev)
            kpos_cached = low[:, None] + span[None, :]
            valid_cached = span[None, :] < cached[:, None]
            kpos = torch.cat([kpos_cached, qpos], 1)
            valid_k = torch.cat([valid_cached, valid_q], 1)
            key_slots = self._slots(table, kpos) * valid_k
            mask = valid_k[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])
            if group == SLIDING:
                mask &= kpos[:, None, :] > qpos[:, :, None] - self.window
            mask |= ~valid_q[:, :, None]  # padded query rows: anything finite, their output is dropped
            write_slots = key_slots[:, kpos_cached.shape[1] :][rows, cols]
            groups[group] = GroupIndex(key_slots, mask[:, None], write_tokens, write_slots)
        return AttentionPart(tokens, grid_index, batch, max_q, groups)

    def _slots(self, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        block = (pos // self.block_size).clamp(max=table.shape[1] - 1)
        return table.gather(1, block) * self.block_size + pos % self.block_size


def sliding_pool_blocks(
    config: ModelConfig, max_num_seqs: int, block_size: int, max_num_batched_tokens: int
) -> int:
    """Sliding blocks for max_num_seqs sequences at once: a window each, two partial edge blocks, and a
    whole step's chunk that is written before the step's end hands most of it back."""
    if not any(config.is_sliding(i) for i in range(config.num_hidden_layers)):
        return 0
    window_blocks = math.ceil(max(config.sliding_window - 1, 1) / block_size)
    return max_num_seqs * (window_blocks + 2) + math.ceil(max_num_batched_tokens / block_size)


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, *(len(t) for t in tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64, device=device)
    return padded.clamp(min=0)  # DROPPED entries are never read: the masks exclude their positions
