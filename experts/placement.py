"""Assignment of routed experts to expert shards."""

from typing import Literal

import torch

STRATEGIES = ("contiguous", "round_robin")


class ExpertPlacement:
    """Which expert shard (0..num_shards-1) owns each routed expert, and its index inside that shard."""

    def __init__(
        self,
        num_experts: int,
        num_shards: int,
        strategy: Literal["contiguous", "round_robin"] = "contiguous",
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if num_shards > num_experts:
            raise ValueError(
                f"num_shards ({num_shards}) exceeds num_experts ({num_experts}): a shard would own none"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; expected one of {STRATEGIES}")
        self.num_experts = num_experts
        self.num_shards = num_shards
        self.strategy = strategy
        experts = torch.arange(num_experts)
        if strategy == "contiguous":
            # Uneven splits give the first `extra` shards one expert more: 10 on 3 -> 4, 3, 3.
            base, extra = divmod(num_experts, num_shards)
            counts = torch.tensor([base + (shard < extra) for shard in range(num_shards)])
            self.shard_of = torch.repeat_interleave(torch.arange(num_shards), counts)
            starts = torch.cumsum(counts, 0) - counts
            self.local_index = experts - starts[self.shard_of]
        else:
            self.shard_of = experts % num_shards
            self.local_index = experts // num_shards
        self._members = [experts[self.shard_of == shard].tolist() for shard in range(num_shards)]

    def experts_of(self, shard: int) -> list[int]:
        """Global expert ids owned by `shard`, in local-index order."""
        return list(self._members[self._check(shard)])

    def num_local(self, shard: int) -> int:
        return len(self._members[self._check(shard)])

    def _check(self, shard: int) -> int:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range for {self.num_shards} shards")
        return shard
