"""Dispatch and combine of routed tokens, both sides of the exchange.

Per MoE layer each token goes ONCE to every expert shard that owns at least one of its top-k experts,
carrying its local expert ids and weights for that shard (-1 / 0 in unused slots). Rows are ordered
by destination shard so that one `all_to_all` with split sizes moves them. A shard returns one partial
sum per row; the router adds the partial sums per token.

On the wire a row is [hidden | ids and weights as fp32, reinterpreted as the hidden dtype], so that
the metadata travels in the same collective as the activations and is bit-exact in bf16 too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from experts.placement import ExpertPlacement
from experts.shard import ExpertShard
from router.transport import ROUTER_RANK, Op, Transport, header


@dataclass
class DispatchPlan:
    token_index: torch.Tensor  # [P] token of each row, rows grouped by destination shard
    local_ids: torch.Tensor  # [P, k] int64, -1 where the slot's expert lives on another shard
    weights: torch.Tensor  # [P, k] fp32, 0 in unused slots
    shard_counts: list[int]  # rows per shard


def plan_dispatch(ids: torch.Tensor, weights: torch.Tensor, placement: ExpertPlacement) -> DispatchPlan:
    shard = placement.shard_of[ids]
    hit = torch.zeros(ids.shape[0], placement.num_shards, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, shard, True)
    row_shard, token = hit.T.nonzero(as_tuple=True)  # sorted by shard, then token
    match = shard[token] == row_shard[:, None]
    local_ids = torch.where(match, placement.local_index[ids[token]], -1)
    row_weights = torch.where(match, weights[token], 0.0)
    counts = hit.sum(0).tolist()
    return DispatchPlan(token, local_ids, row_weights.float(), counts)


def pack_rows(hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    meta = torch.cat([local_ids.float(), weights.float()], dim=1).contiguous()
    return torch.cat([hidden, meta.view(hidden.dtype)], dim=1)


def unpack_rows(rows: torch.Tensor, hidden_size: int, top_k: int) -> tuple[torch.Tensor, ...]:
    meta = rows[:, hidden_size:].contiguous().view(torch.float32)
    return rows[:, :hidden_size], meta[:, :top_k].long(), meta[:, top_k:]


def row_width(hidden_size: int, top_k: int, dtype: torch.dtype) -> int:
    return hidden_size + 2 * top_k * 4 // dtype.itemsize


@dataclass
class ExchangeStats:
    """Accumulated over steps; read and reset by whoever reports metrics.

    The last three are recorded only while the routed experts' `detail` switch is on: the router's
    time in attention blocks and in gates (timed by the model), and per MoE layer the (token, expert)
    pairs routed to each expert, as a [num_experts] int64 tensor on the router's device.
    """

    rows_sent: int = 0
    payload_bytes: int = 0  # activations only: rows x hidden x dtype size
    meta_bytes: int = 0
    seconds: float = 0.0
    attention_seconds: float = 0.0
    gate_seconds: float = 0.0
    expert_tokens: dict[int, torch.Tensor] = field(default_factory=dict)

    def count_experts(self, layer: int, ids: torch.Tensor, num_experts: int) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=num_experts)
        total = self.expert_tokens.get(layer)
        self.expert_tokens[layer] = counts if total is None else total.add_(counts)


@dataclass
class ExpertStats:
    """An expert rank's counters, accumulated over steps (see run_expert_loop)."""

    steps: int = 0
    rows: int = 0  # token rows received, over all MoE layers
    compute_seconds: float = 0.0  # in the shard's expert forward


class RoutedExperts(Protocol):
    """What the model calls for the routed part of a MoE layer (the shared expert is passed in)."""

    stats: ExchangeStats
    detail: bool  # also time the model's phases and count tokens per expert (metrics)

    def begin_step(self, num_tokens: int) -> None: ...

    def heartbeat(self) -> None:
        """Tells idle expert ranks the router is alive (no-op without a transport)."""

    def __call__(
        self,
        layer: int,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        shared: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """Returns shared(hidden) + the weighted sum of each token's routed experts."""


class CollectiveExperts:
    """Router side of the exchange over a Transport; expert ranks run `serve_expert_step`."""

    def __init__(self, transport: Transport, placement: ExpertPlacement, top_k: int) -> None:
        if transport.world_size != placement.num_shards + 1:
            raise ValueError(
                f"transport has {transport.world_size} ranks, placement needs {placement.num_shards + 1}"
            )
        self.transport = transport
        self.placement = placement
        self.top_k = top_k
        self.stats = ExchangeStats()
        self.detail = False
        self._step = 0
        self._side_stream: torch.cuda.Stream | None = None

    def begin_step(self, num_tokens: int) -> None:
        self._step += 1
        self.transport.broadcast_header(header(Op.FORWARD, num_tokens, self._step))

    def stop(self) -> None:
        self.transport.broadcast_header(header(Op.STOP))

    def heartbeat(self) -> None:
        self.transport.broadcast_header(header(Op.HEARTBEAT))

    def _beside_the_exchange(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """On a GPU, runs `compute` on a side stream so it overlaps the collectives on the main one."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        self._side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side_stream):
            return compute()

    def __call__(self, layer, hidden, ids, weights, shared):
        start = time.perf_counter()
        world = self.transport.world_size
        plan = plan_dispatch(ids, weights, self.placement)
        if self.detail:
            self.stats.count_experts(layer, ids, self.placement.num_experts)
        splits = [0, *plan.shard_counts]
        counts = torch.tensor(splits, dtype=torch.int64, device=hidden.device).view(world, 1)
        self.transport.all_to_all(counts, [1] * world, [1] * world).wait()
        payload = pack_rows(hidden[plan.token_index], plan.local_ids, plan.weights)
        self.transport.all_to_all(payload, splits, [0] * world).wait()
        combine = self.transport.all_to_all(hidden.new_empty(0, hidden.shape[1]), [0] * world, splits)
        dispatched = time.perf_counter()
        out = self._beside_the_exchange(shared) if hidden.is_cuda else shared()
        overlapped = time.perf_counter() - dispatched
        partial = combine.wait()
        if hidden.is_cuda:
            torch.cuda.current_stream().wait_stream(self._side_stream)
        out.index_add_(0, plan.token_index, partial)
        rows = plan.token_index.numel()
        self.stats.rows_sent += rows
        self.stats.payload_bytes += rows * hidden.shape[1] * hidden.dtype.itemsize
        self.stats.meta_bytes += rows * (payload.shape[1] - hidden.shape[1]) * hidden.dtype.itemsize
        self.stats.seconds += time.perf_counter() - start - overlapped
        return out


def serve_expert_step(
    transport: Transport, shard: ExpertShard, top_k: int, dtype: torch.dtype, stats: ExpertStats | None = None
) -> None:
    """One forward step on an expert rank: every MoE layer's counts, dispatch, compute, combine.

    With `stats`, also counts the rows received and times the expert compute.
    """
    world = transport.world_size
    width = row_width(shard.hidden_size, top_k, dtype)
    for layer in range(shard.num_layers):
        zeros = torch.zeros(world, 1, dtype=torch.int64, device=transport.device)
        counts = transport.all_to_all(zeros, [1] * world, [1] * world).wait()
        rows_in = int(counts[ROUTER_RANK])
        from_router = [0] * world
        from_router[ROUTER_RANK] = rows_in
        empty = torch.empty(0, width, dtype=dtype, device=transport.device)
        rows = transport.all_to_all(empty, [0] * world, from_router).wait()
        hidden, local_ids, weights = unpack_rows(rows, shard.hidden_size, top_k)
        started = time.perf_counter()
        out = shard.forward(layer, hidden, local_ids, weights)
        if stats is not None:
            stats.compute_seconds += time.perf_counter() - started
            stats.rows += rows_in
        transport.all_to_all(out, from_router, [0] * world).wait()


def run_expert_loop(
    transport: Transport,
    shard: ExpertShard,
    top_k: int,
    dtype: torch.dtype,
    on_step: Callable[[ExpertStats], None] | None = None,
) -> int:
    """The expert rank's SPMD loop: wait for a step header, serve it, until STOP. Returns steps served.

    With `on_step`, the rank's counters are kept and passed to it after every step (metrics).
    """
    stats = ExpertStats()
    while True:
        op = Op(int(transport.broadcast_header(None)[0]))
        if op == Op.STOP:
            return stats.steps
        if op == Op.HEARTBEAT:
            continue
        serve_expert_step(transport, shard, top_k, dtype, stats if on_step else None)
        stats.steps += 1
        if on_step:
            on_step(stats)


class LocalExperts:
    """All shards in the router's own process: the same plan and compute with no transport.

    For single-process use and tests; a cluster uses CollectiveExperts.
    """

    def __init__(self, shards: list[ExpertShard], placement: ExpertPlacement) -> None:
        self.shards = shards
        self.placement = placement
        self.stats = ExchangeStats()
        self.detail = False

    def begin_step(self, num_tokens: int) -> None:
        return None

    def heartbeat(self) -> None:
        return None

    def __call__(self, layer, hidden, ids, weights, shared):
        plan = plan_dispatch(ids, weights, self.placement)
        if self.detail:
            self.stats.count_experts(layer, ids, self.placement.num_experts)
        out = shared()
        start = 0
        for shard, count in zip(self.shards, plan.shard_counts, strict=True):
            rows = plan.token_index[start : start + count]
            part = shard.forward(
                layer,
                hidden[rows],
                plan.local_ids[start : start + count],
                plan.weights[start : start + count],
            )
            out.index_add_(0, rows, part)
            start += count
        return out
