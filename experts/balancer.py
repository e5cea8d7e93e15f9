"""Expert-parallel load balancing: the placement of replicas that evens out the shards' load.

Greedy, in two passes over the observed per-expert load (e.g. routed pairs over the last window):
the extra slots go one by one to the expert whose replicas carry the most load each (so a hot expert
gets several, up to a cap: each cap is tried), then the replicas, heaviest share first, each go to
the least-loaded shard that has a free slot and no replica of that expert yet. A shard keeps its slot
count, and an expert that stays on a shard keeps its weights there (no bytes move for it). The result
is kept only when its heaviest shard is lighter than the current placement's on the same load, so it
is never worse. Each MoE layer is balanced on its own load (`rebalance_model`): a step waits, in every
layer, for that layer's heaviest shard.
"""

from __future__ import annotations

import heapq

import torch

from experts.placement import ExpertPlacement, ModelPlacement


def replica_counts(load: torch.Tensor, slots: int, max_per_expert: int) -> list[int]:
    """How many replicas each expert gets: one each, then the rest to the heaviest load per replica."""
    loads = load.double().tolist()
    counts = [1] * len(loads)
    heap = [(-w, e) for e, w in enumerate(loads) if max_per_expert > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(loads)):
        if not heap:
            raise ValueError(f"{slots} slots cannot be filled by {len(loads)} experts x {max_per_expert}")
        _, expert = heapq.heappop(heap)
        counts[expert] += 1
        if counts[expert] < max_per_expert:
            heapq.heappush(heap, (-loads[expert] / counts[expert], expert))
    return counts


def pack(
    load: torch.Tensor, counts: list[int], capacity: list[int], current: ExpertPlacement
) -> list[list[int]] | None:
    """Slots per shard for these replica counts; None where the greedy packing gets stuck."""
    loads = load.double().tolist()
    items = sorted(
        ((loads[e] / c, e) for e, c in enumerate(counts) for _ in range(c)), key=lambda x: (-x[0], x[1])
    )
    shard_load = [0.0] * len(capacity)
    members: list[set[int]] = [set() for _ in capacity]
    had = [set(current.experts_of(s)) for s in range(current.num_shards)]
    for share, expert in items:
        free = [s for s in range(len(capacity)) if len(members[s]) < capacity[s] and expert not in members[s]]
        if not free:
            return None
        shard = min(free, key=lambda s: (shard_load[s], expert not in had[s], s))
        members[shard].add(expert)
        shard_load[shard] += share
    slots = []
    for shard in range(len(capacity)):
        # experts the shard held keep their slot order first, then the new ones: fewer copies on reload
        kept = [e for e in current.experts_of(shard) if e in members[shard]]
        slots.append(kept + sorted(members[shard] - set(kept)))
    return slots


def rebalance(load: torch.Tensor, current: ExpertPlacement) -> ExpertPlacement:
    """The placement with `current`'s slot counts that minimises the heaviest shard's `load`, or
    `current` itself when the greedy one is not lighter."""
    if load.shape != (current.num_experts,):
        raise ValueError(f"load has shape {tuple(load.shape)}, expected ({current.num_experts},)")
    if float(load.sum()) <= 0:
        return current
    capacity = [current.num_local(s) for s in range(current.num_shards)]
    best, heaviest = current, float(current.rank_load(load).max()) * (1 - 1e-9)
    # Whole replicas do not split load evenly: a cap on replicas per expert can pack better (two hot
    # experts with two replicas each on four shards beat three each), so every cap is tried.
    for cap in range(1, sum(1 for c in capacity if c) + 1):
        if cap * current.num_experts < current.num_slots:
            continue
        slots = pack(load, replica_counts(load, current.num_slots, cap), capacity, current)
        if slots is None:
            continue
        candidate = ExpertPlacement.from_slots(current.num_experts, slots)
        if float(candidate.rank_load(load).max()) < heaviest:
            best, heaviest = candidate, float(candidate.rank_load(load).max())
    return best


def imbalance(placement: ExpertPlacement, load: torch.Tensor) -> float | None:
    """max / mean of the live shards' load under `placement`; None without load."""
    heaviest, mean = _heaviest_and_mean(placement, load)
    return heaviest / mean if mean > 0 else None


def _heaviest_and_mean(placement: ExpertPlacement, load: torch.Tensor) -> tuple[float, float]:
    """The heaviest shard's load and the live shards' mean under `placement`."""
    per_shard = placement.rank_load(load)
    live = torch.tensor([placement.num_local(s) > 0 for s in range(placement.num_shards)])
    return float(per_shard.max()), float(per_shard[live].mean())


def rebalance_model(load: torch.Tensor, current: ModelPlacement) -> ModelPlacement:
    """Each MoE layer rebalanced on its own row of `load` [num_layers, num_experts]."""
    if load.shape != (current.num_layers, current.num_experts):
        raise ValueError(
            f"load has shape {tuple(load.shape)}, expected ({current.num_layers}, {current.num_experts})"
        )
    layers = [rebalance(row, placement) for row, placement in zip(load, current.layers, strict=True)]
    return ModelPlacement(layers) if layers != list(current.layers) else current


def step_imbalance(placement: ModelPlacement, load: torch.Tensor) -> float | None:
    """Summed over the MoE layers, the heaviest live shard's load over the mean one's: how much longer a
    step's expert compute takes than on a perfectly even placement (each layer waits for its heaviest
    shard). None without load."""
    pairs = [_heaviest_and_mean(layer, row) for row, layer in zip(load, placement.layers, strict=True)]
    mean = sum(m for _, m in pairs)
    return sum(h for h, _ in pairs) / mean if mean > 0 else None
