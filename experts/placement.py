"""Assignment of logical experts to physical expert slots on the expert shards.

Each shard holds an ordered list of slots, each slot one logical expert's weights; a logical expert
has one or more replicas (shard, slot), never two on one shard. Without redundant experts every
expert has exactly one slot (contiguous blocks or round robin); `redundant` adds that many slots.
"""

from __future__ import annotations

from typing import Literal

import torch

STRATEGIES = ("contiguous", "round_robin")


def max_redundant(num_experts: int, num_shards: int) -> int:
    """The most extra slots the shards can hold: one shard never holds two replicas of an expert."""
    return num_experts * (num_shards - 1)


def check_layout(num_experts: int, num_shards: int, redundant: int = 0) -> None:
    """Raises ValueError for a shard count or redundant-slot count the experts cannot fill."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > num_experts:
        raise ValueError(
            f"num_shards ({num_shards}) exceeds num_experts ({num_experts}): a shard would own none"
        )
    limit = max_redundant(num_experts, num_shards)
    if not 0 <= redundant <= limit:
        raise ValueError(
            f"redundant_experts must be between 0 and {limit} (num_experts {num_experts} x "
            f"(expert_shards {num_shards} - 1): a shard holds at most one replica of an expert), "
            f"got {redundant}"
        )


def _base_slots(num_experts: int, num_shards: int, strategy: str) -> list[list[int]]:
    if strategy == "contiguous":
        # Uneven splits give the first `extra` shards one expert more: 10 on 3 -> 4, 3, 3.
        base, extra = divmod(num_experts, num_shards)
        bounds = [0]
        for shard in range(num_shards):
            bounds.append(bounds[-1] + base + (shard < extra))
        return [list(range(bounds[s], bounds[s + 1])) for s in range(num_shards)]
    return [list(range(shard, num_experts, num_shards)) for shard in range(num_shards)]


class ExpertPlacement:
    """Which slots of which shards (0..num_shards-1) hold each logical expert.

    `shard_of` / `local_index` name each expert's first replica; `replica_shard` / `replica_slot`
    [num_experts, max_replicas] all of them, padded by repeating the first, and `replica_count` how many.
    """

    def __init__(
        self,
        num_experts: int,
        num_shards: int,
        strategy: Literal["contiguous", "round_robin"] = "contiguous",
        redundant: int = 0,
    ) -> None:
        check_layout(num_experts, num_shards, redundant)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; expected one of {STRATEGIES}")
        slots = _base_slots(num_experts, num_shards, strategy)
        home = [0] * num_experts
        for shard, experts in enumerate(slots):
            for expert in experts:
                home[expert] = shard
        # Replica round r of expert e goes to shard (home + r) mod S: r < S keeps it off e's other
        # shards. Experts in (local index, shard) order, so a partial round spreads over the shards.
        order = sorted(range(num_experts), key=lambda e: (slots[home[e]].index(e), home[e]))
        for n in range(redundant):
            expert = order[n % num_experts]
            slots[(home[expert] + 1 + n // num_experts) % num_shards].append(expert)
        self._init(num_experts, slots, home)
        self.strategy = strategy

    @classmethod
    def from_slots(cls, num_experts: int, slots: list[list[int]]) -> ExpertPlacement:
        """A placement with these slots per shard (a shard may have none, e.g. a dead rank's)."""
        placement = cls.__new__(cls)
        placement._init(num_experts, [list(s) for s in slots])
        placement.strategy = "custom"
        return placement

    def _init(self, num_experts: int, slots: list[list[int]], home: list[int] | None = None) -> None:
        self.num_experts = num_experts
        self.num_shards = len(slots)
        self._slots = slots
        replicas: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
        for shard, experts in enumerate(slots):
            if len(set(experts)) != len(experts):
                raise ValueError(f"shard {shard} holds two replicas of one expert: {experts}")
            for slot, expert in enumerate(experts):
                if not 0 <= expert < num_experts:
                    raise ValueError(f"shard {shard} slot {slot}: expert {expert} out of range")
                replicas[expert].append((shard, slot))
        if home is not None:  # the base slot first: it is `shard_of` / `local_index`
            for expert, found in enumerate(replicas):
                found.sort(key=lambda r, e=expert: (r[0] != home[e], r[0]))
        missing = [e for e, r in enumerate(replicas) if not r]
        if missing:
            raise ValueError(f"experts {missing} have no slot")
        self._replicas = replicas
        width = max(len(r) for r in replicas)
        padded = [r + [r[0]] * (width - len(r)) for r in replicas]
        self.replica_shard = torch.tensor([[s for s, _ in r] for r in padded], dtype=torch.int64)
        self.replica_slot = torch.tensor([[i for _, i in r] for r in padded], dtype=torch.int64)
        self.replica_count = torch.tensor([len(r) for r in replicas], dtype=torch.int64)
        self.shard_of = self.replica_shard[:, 0].clone()
        self.local_index = self.replica_slot[:, 0].clone()
        self.num_slots = sum(len(s) for s in slots)

    @property
    def redundant(self) -> int:
        return self.num_slots - self.num_experts

    def experts_of(self, shard: int) -> list[int]:
        """Logical expert of each of `shard`'s slots, in slot order."""
        return list(self._slots[self._check(shard)])

    def num_local(self, shard: int) -> int:
        return len(self._slots[self._check(shard)])

    def replicas_of(self, expert: int) -> list[tuple[int, int]]:
        """(shard, slot) of each replica of `expert`."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range for {self.num_experts} experts")
        return list(self._replicas[expert])

    def without_ranks(self, dead: set[int]) -> ExpertPlacement | None:
        """The same slots with the `dead` shards' emptied (shard indices unchanged); None when some
        expert has no replica left on a live shard."""
        for shard in dead:
            self._check(shard)
        slots = [[] if shard in dead else list(s) for shard, s in enumerate(self._slots)]
        if len({e for s in slots for e in s}) < self.num_experts:
            return None
        return ExpertPlacement.from_slots(self.num_experts, slots)

    def rank_load(self, expert_load: torch.Tensor) -> torch.Tensor:
        """Per shard, the load its slots get when each expert's load splits evenly over its replicas."""
        share = expert_load.double() / self.replica_count.double()
        load = torch.zeros(self.num_shards, dtype=torch.float64)
        for shard, experts in enumerate(self._slots):
            if experts:
                load[shard] = share[experts].sum()
        return load

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertPlacement) and (self.num_experts, self._slots) == (
            other.num_experts,
            other._slots,
        )

    def __hash__(self) -> int:
        return hash((self.num_experts, tuple(map(tuple, self._slots))))

    def __repr__(self) -> str:
        return f"ExpertPlacement({self.num_experts} experts, slots={self._slots})"

    def _check(self, shard: int) -> int:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range for {self.num_shards} shards")
        return shard


class ModelPlacement:
    """One ExpertPlacement per MoE layer (list index = MoE layer ordinal), each with the same slot count
    on each shard: a shard's slot s of layer l holds `layer(l).experts_of(shard)[s]`.

    Hot experts differ from layer to layer, so each layer is balanced on its own load (as DeepSeek's
    EPLB does); at start every layer has the same static placement.
    """

    def __init__(self, layers: list[ExpertPlacement]) -> None:
        if not layers:
            raise ValueError("a model placement needs at least one MoE layer")
        first = layers[0]
        capacity = [first.num_local(s) for s in range(first.num_shards)]
        for index, placement in enumerate(layers):
            if placement.num_experts != first.num_experts or placement.num_shards != first.num_shards:
                raise ValueError(
                    f"MoE layer {index}: {placement.num_experts} experts on {placement.num_shards} shards, "
                    f"layer 0 has {first.num_experts} on {first.num_shards}"
                )
            held = [placement.num_local(s) for s in range(placement.num_shards)]
            if held != capacity:
                raise ValueError(f"MoE layer {index}: slots per shard {held}, layer 0 has {capacity}")
        self.layers = tuple(layers)
        self.num_layers = len(layers)
        self.num_experts, self.num_shards = first.num_experts, first.num_shards
        self.num_slots = first.num_slots

    @classmethod
    def uniform(
        cls,
        num_layers: int,
        num_experts: int,
        num_shards: int,
        strategy: Literal["contiguous", "round_robin"] = "contiguous",
        redundant: int = 0,
    ) -> ModelPlacement:
        """The start placement: the same static one on every MoE layer."""
        return cls([ExpertPlacement(num_experts, num_shards, strategy, redundant)] * num_layers)

    @property
    def redundant(self) -> int:
        return self.num_slots - self.num_experts

    def layer(self, index: int) -> ExpertPlacement:
        return self.layers[index]

    def num_local(self, shard: int) -> int:
        return self.layers[0].num_local(shard)

    def slots_of(self, shard: int) -> list[list[int]]:
        """Per MoE layer, the logical expert of each of `shard`'s slots."""
        return [placement.experts_of(shard) for placement in self.layers]

    def without_ranks(self, dead: set[int]) -> ModelPlacement | None:
        """Every layer without the `dead` shards' slots; None when some layer's expert has no live replica."""
        layers = [placement.without_ranks(dead) for placement in self.layers]
        return None if any(p is None for p in layers) else ModelPlacement(layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelPlacement) and self.layers == other.layers

    def __hash__(self) -> int:
        return hash(self.layers)

    def __repr__(self) -> str:
        return f"ModelPlacement({self.num_layers} MoE layers, {self.layers[0]!r} first)"
