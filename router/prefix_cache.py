"""Automatic prefix caching: which leading blocks of a new sequence are already in the cache.

A full block is named by a hash of its tokens chained with the hash of the block before it; the chain
starts from a hash of the model's config, so one block hash stands for the block's whole prefix and
model, and two sequences share a block exactly when they share every token up to its end.

The hybrid rule (full-attention and sliding-window layers, each group with its own block pool): a
prefix of n blocks (L = n * block_size tokens) can be reused when

- every full-attention layer still has all n blocks: a full layer reads every earlier position;
- every sliding-window layer still has the blocks that hold positions [L - (window - 1), L): the next
  query, at position L, sees only the window - 1 positions before it, and every later query sees even
  later ones. Older sliding blocks may long be evicted; their entries stay empty in the table.

Full layers bound n from the left (the first missing block ends the prefix); the sliding condition is
then checked from the longest candidate down, so the answer is the longest n satisfying both. At least
one token of the sequence is always computed (its logits give the next token), so n * block_size stays
below the sequence's length, as in vLLM's hybrid KV cache manager.
"""

from __future__ import annotations

import hashlib
from array import array

from router.block_pool import BlockPool


def model_root(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=16).digest()


def extend_hashes(root: bytes, tokens: list[int], block_size: int, hashes: list[bytes]) -> None:
    """Appends to `hashes` the chained hashes of the full blocks of `tokens`, the tokens that follow them."""
    for block in range(len(tokens) // block_size):
        parent = hashes[-1] if hashes else root
        chunk = array("q", tokens[block * block_size : (block + 1) * block_size]).tobytes()
        hashes.append(hashlib.blake2b(parent + chunk, digest_size=16).digest())


def longest_prefix(
    hashes: list[bytes],
    limit: int,
    full: BlockPool | None,
    sliding: BlockPool | None,
    window: int,
    block_size: int,
) -> int:
    """Blocks (at most `limit`) of the longest prefix both layer groups can reuse (see the module doc)."""
    n = min(len(hashes), limit)
    if full is not None:
        present = 0
        while present < n and full.cached(hashes[present]) is not None:
            present += 1
        n = present
    if sliding is None:
        return n
    runs, run = [], 0  # runs[i]: consecutive cached sliding blocks ending at block i
    for block_hash in hashes[:n]:
        run = run + 1 if sliding.cached(block_hash) is not None else 0
        runs.append(run)
    for blocks in range(n, 0, -1):
        first = sliding_first_block(blocks * block_size, window, block_size)
        if runs[blocks - 1] >= blocks - first:
            return blocks
    return 0


def sliding_first_block(position: int, window: int, block_size: int) -> int:
    """The first block a sliding layer still needs for queries at `position` and later."""
    return max(0, position - (window - 1)) // block_size
