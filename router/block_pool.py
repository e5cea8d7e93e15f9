"""The KV blocks of one layer group: reference counts, and free blocks that stay cached until reused.

A block is in use while some sequence references it (shared prefix blocks have several references).
When its last reference goes it joins the free queue but keeps its contents and its hash, so a later
request with the same prefix can take it back; allocation takes the least recently freed block and
only then forgets (evicts) what it held. A block is therefore either in use or free, never both, and
only an unreferenced block is ever evicted.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache: {n} blocks wanted, {len(self._free)} free")
        taken = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self.refs[block] = 1
            taken.append(block)
        return taken

    def touch(self, blocks: list[int]) -> None:
        """One more reference to each of these (cached) blocks, taking them out of the free queue."""
        for block in blocks:
            if self.refs[block] == 0:
                del self._free[block]
            self.refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drops one reference each; blocks left unreferenced become free, the last one given most recent."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise RuntimeError(f"KV block {block} released more often than taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self._free[block] = None

    def cached(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def register(self, block: int, block_hash: bytes) -> None:
        """Marks a filled block as holding the prefix `block_hash`; the first copy of a prefix wins."""
        if block_hash in self._cached or self._hash_of[block] is not None:
            return
        self._hash_of[block] = block_hash
        self._cached[block_hash] = block

    def num_cached(self) -> int:
        return len(self._cached)

    def _evict(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            self._hash_of[block] = None
            del self._cached[block_hash]
