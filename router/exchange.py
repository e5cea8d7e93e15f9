"""Dispatch and combine of routed tokens: the router's side of the exchange (router/expert_loop.py the other).

Per MoE layer and micro-batch each token goes ONCE to every expert rank that owns at least one of its
top-k experts, carrying its local expert ids and weights for that rank (-1 / 0 in unused slots): one
DISPATCH message per rank that has rows, none to a rank without, so the router knows whom to wait for.
A rank answers with one COMBINE message, one partial sum per row; the router adds them per token.

`dispatch` returns as soon as the messages are handed to the transport and `combine` waits for the
answers, so the router computes something else in between (the shared expert, the other micro-batch).
Combines must come in the order of their dispatches: each rank answers in the order it received.

On the wire a row is [hidden | ids and weights as fp32, reinterpreted as the hidden dtype], so that
the metadata travels in the same message as the activations and is bit-exact in bf16 too.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from experts.placement import ExpertPlacement, ModelPlacement
from experts.shard import ExpertShard
from router.errors import TransportError
from router.transport import OP, Op, Transport, head


@dataclass
class DispatchPlan:
    token_index: torch.Tensor  # [P] token of each row, rows grouped by destination shard
    local_ids: torch.Tensor  # [P, k] int64, -1 where the slot's expert lives on another shard
    weights: torch.Tensor  # [P, k] fp32, 0 in unused slots
    shard_counts: list[int]  # rows per shard
    shard_pairs: list[int]  # (token, expert) pairs per shard: its compute load


def plan_dispatch(
    ids: torch.Tensor, weights: torch.Tensor, placement: ExpertPlacement, offset: torch.Tensor | None = None
) -> DispatchPlan:
    shard, slot = choose_replicas(ids, placement, offset)
    hit = torch.zeros(ids.shape[0], placement.num_shards, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, shard, True)
    row_shard, token = hit.T.nonzero(as_tuple=True)  # sorted by shard, then token
    match = shard[token] == row_shard[:, None]
    local_ids = torch.where(match, slot[token], -1)
    row_weights = torch.where(match, weights[token], 0.0)
    pairs = torch.zeros(placement.num_shards, dtype=torch.int64, device=ids.device)
    pairs.index_add_(0, row_shard, match.sum(1))
    counts, per_shard = torch.stack([hit.sum(0), pairs]).tolist()
    return DispatchPlan(token, local_ids, row_weights.float(), counts, per_shard)


def choose_replicas(
    ids: torch.Tensor, placement: ExpertPlacement, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(shard, slot) [T, k] serving each (token, expert): the n-th pair of the batch routed to expert e
    goes to e's replica (offset[e] + n) mod (replicas of e). With `offset` the pairs routed to e before
    (ExpertLoad), an expert's pairs go round robin over its replicas across batches, small ones too."""
    replica_shard = placement.replica_shard.to(ids.device)
    replica_slot = placement.replica_slot.to(ids.device)
    if replica_shard.shape[1] == 1:
        return replica_shard[ids, 0], replica_slot[ids, 0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=placement.num_experts)
    starts = per_expert.cumsum(0) - per_expert
    if offset is not None:
        starts = starts - offset.to(ids.device)
    position = torch.empty_like(flat)
    position[order] = torch.arange(flat.numel(), device=ids.device) - starts[flat[order]]
    replica = (position % placement.replica_count.to(ids.device)[flat]).view_as(ids)
    return replica_shard[ids, replica], replica_slot[ids, replica]


class ExpertLoad:
    """(token, expert) pairs routed to each expert of each MoE layer since the start: where in its
    replicas' round robin each expert stands, and, as the difference of two readings of `total`, the
    load of a window (the rebalancer's)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self._routed: dict[int, torch.Tensor] = {}

    def offset(self, layer: int) -> torch.Tensor | None:
        return self._routed.get(layer)

    def add(self, layer: int, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        total = self._routed.get(layer)
        self._routed[layer] = counts if total is None else total + counts

    def total(self) -> torch.Tensor:
        """[num_layers, num_experts] int64 on the CPU."""
        out = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        for layer, counts in self._routed.items():
            out[layer] = counts.cpu()
        return out


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
    """The exchange's counters since the engine core last took them (`RoutedExperts.take_stats`)."""

    messages: int = 0  # DISPATCH messages sent
    rows_sent: int = 0
    payload_bytes: int = 0  # activations only: rows x hidden x dtype size
    meta_bytes: int = 0
    wait_seconds: float = 0.0  # blocked in combine: expert time the router's own work did not cover
    rank_pairs: list[int] = field(default_factory=list)  # (token, expert) pairs each expert rank computed

    def add(self, other: ExchangeStats) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                width = max(len(mine), len(theirs))
                mine, theirs = mine + [0] * (width - len(mine)), theirs + [0] * (width - len(theirs))
                setattr(self, f.name, [a + b for a, b in zip(mine, theirs, strict=True)])
            else:
                setattr(self, f.name, mine + theirs)


@dataclass
class Dispatched:
    """One dispatched (MoE layer, micro-batch): whom to wait for, and where their partial sums go."""

    layer: int
    tag: int
    token_index: torch.Tensor
    ranks: list[int]  # expert ranks that got rows, in row order
    counts: list[int]  # rows each of them got
    local: list[torch.Tensor] = field(default_factory=list)  # LocalExperts: the partial sums, per rank


class RoutedExperts(Protocol):
    """What the model calls for the routed part of a MoE layer."""

    placement: ModelPlacement
    load: ExpertLoad

    def dispatch(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tag: int = 0
    ) -> Dispatched: ...

    def combine(self, sent: Dispatched, out: torch.Tensor) -> torch.Tensor:
        """Adds each token's routed experts (weighted) into `out` and returns it."""

    def heartbeat(self) -> None:
        """Tells idle expert ranks the router is alive (no-op without a transport)."""

    def take_stats(self) -> ExchangeStats:
        """The counters since the last call, which starts new ones."""


def _account(stats: ExchangeStats, rows: int, hidden: torch.Tensor, width: int) -> None:
    item = hidden.dtype.itemsize
    stats.rows_sent += rows
    stats.payload_bytes += rows * hidden.shape[1] * item
    stats.meta_bytes += rows * (width - hidden.shape[1]) * item


class TransportExperts:
    """The router's side over a Transport; expert ranks run router.expert_loop.run_expert_loop.

    On a GPU the messages go on a stream of their own, so that the router's kernels (the shared
    expert, the other micro-batch's attention) are not queued behind a combine still in flight.
    A rank that got no rows for `keepalive_s` while others did gets a HEARTBEAT, so that its receive
    does not time out while the router is busy.
    """

    def __init__(
        self, transport: Transport, placement: ModelPlacement, top_k: int, keepalive_s: float = 10.0
    ) -> None:
        if transport.world_size != placement.num_shards + 1:
            raise ValueError(
                f"transport has {transport.world_size} ranks, placement needs {placement.num_shards + 1}"
            )
        self.transport = transport
        self.placement = placement
        self.version = 0  # of the placement: the expert ranks' slots follow it through SWITCH
        self.load = ExpertLoad(placement.num_layers, placement.num_experts)
        self.top_k = top_k
        self.stats = ExchangeStats()
        self.keepalive_s = keepalive_s
        self.absent: frozenset[int] = frozenset()  # expert ranks out of the group since a failover
        self._in_flight: deque[Dispatched] = deque()
        self._comm_stream: torch.cuda.Stream | None = None
        self._last_sent = [time.monotonic()] * transport.world_size
        self._answer_format: tuple[int, torch.dtype] = (1, torch.float32)  # a COMBINE row's width and dtype

    def reconnect(self, transport: Transport, placement: ModelPlacement | None = None) -> None:
        """A re-formed group with every rank: what was in flight on the old one is lost (the step is
        re-run)."""
        self.transport = transport
        if placement is not None:
            self.placement = placement
        self.absent = frozenset()
        self._in_flight.clear()
        self._last_sent = [time.monotonic()] * transport.world_size

    def fail_over(self, placement: ModelPlacement, absent: set[int]) -> None:
        """Goes on without the (dead) expert ranks in `absent`, by `placement`, which routes to live ranks
        only. The failed step's answers that live ranks still owe are drained first: each echoes a FLUSH
        after everything it was sent before it, so no stale COMBINE is read as the re-run step's."""
        self._in_flight.clear()
        live = [r for r in self._live_ranks() if r not in absent]
        for rank in live:
            self._send(rank, head(Op.FLUSH))
        width, dtype = self._answer_format
        for rank in live:
            while self._recv(rank, width, dtype)[0][OP] != Op.FLUSH:
                pass
        self.placement, self.absent = placement, frozenset(absent)

    def take_stats(self) -> ExchangeStats:
        stats, self.stats = self.stats, ExchangeStats()
        return stats

    def switch(self, placement: ModelPlacement, version: int) -> None:
        """From the next dispatch on, `placement`; each rank switches to the slots it prepared for
        `version` when the SWITCH arrives, after every dispatch of the old placement."""
        if placement.num_shards != self.placement.num_shards:
            raise ValueError(f"placement has {placement.num_shards} shards, not {self.placement.num_shards}")
        self._broadcast(Op.SWITCH, version)
        self.placement, self.version = placement, version

    def dispatch(self, layer, hidden, ids, weights, tag=0):
        plan = plan_dispatch(ids, weights, self.placement.layer(layer), self.load.offset(layer))
        self.load.add(layer, ids)
        payload = pack_rows(hidden.index_select(0, plan.token_index), plan.local_ids, plan.weights)
        self._answer_format = (hidden.shape[1], hidden.dtype)  # before any send: fail_over reads it
        ranks, counts, start, now = [], [], 0, time.monotonic()
        with self._comm(hidden, wait_for_main=True):
            for rank, count in enumerate(plan.shard_counts, start=1):
                if count:
                    self._send(rank, head(Op.DISPATCH, layer, count, tag), payload[start : start + count])
                    ranks.append(rank)
                    counts.append(count)
                    start += count
                elif rank not in self.absent and now - self._last_sent[rank] > self.keepalive_s:
                    self._send(rank, head(Op.HEARTBEAT))
                else:
                    continue
                self._last_sent[rank] = now
            if payload.is_cuda:
                payload.record_stream(torch.cuda.current_stream())
        self.stats.messages += len(ranks)
        _account(self.stats, start, hidden, payload.shape[1])
        self.stats.add(ExchangeStats(rank_pairs=plan.shard_pairs))
        sent = Dispatched(layer, tag, plan.token_index, ranks, counts)
        self._in_flight.append(sent)
        return sent

    def combine(self, sent, out):
        if not self._in_flight or self._in_flight[0] is not sent:
            raise RuntimeError("combine called out of dispatch order")
        self._in_flight.popleft()
        started = time.perf_counter()
        answers = []
        with self._comm(out, wait_for_main=False):
            for rank, count in zip(sent.ranks, sent.counts, strict=True):
                got, rows = self._recv(rank, out.shape[1], out.dtype)
                if got != head(Op.COMBINE, sent.layer, count, sent.tag):
                    raise TransportError(
                        f"rank {rank} answered {got}, expected COMBINE of MoE layer {sent.layer}, "
                        f"{count} rows, micro-batch {sent.tag}",
                        rank,
                    )
                answers.append(rows)  # each from another rank: still valid (Transport.recv)
        if out.is_cuda:
            main = torch.cuda.current_stream()
            main.wait_stream(self._comm_stream)
            for rows in answers:
                rows.record_stream(main)
        self.stats.wait_seconds += time.perf_counter() - started
        start = 0
        for count, rows in zip(sent.counts, answers, strict=True):
            out.index_add_(0, sent.token_index[start : start + count], rows)
            start += count
        return out

    @contextlib.contextmanager
    def _comm(self, tensor: torch.Tensor, wait_for_main: bool) -> Iterator[None]:
        """On a GPU, runs the enclosed transport calls on the exchange's stream; a dispatch's sends
        first wait for the kernels that produced their payload."""
        if not tensor.is_cuda:
            yield
            return
        if self._comm_stream is None:
            self._comm_stream = torch.cuda.Stream(tensor.device)
        if wait_for_main:
            self._comm_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._comm_stream):
            yield

    def _send(self, rank: int, message: list[int], payload: torch.Tensor | None = None) -> None:
        try:
            self.transport.send(rank, message, payload)
        except TransportError as err:
            err.rank = rank if err.rank is None else err.rank
            raise

    def _recv(self, rank: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        try:
            return self.transport.recv(rank, width, dtype)
        except TransportError as err:
            err.rank = rank if err.rank is None else err.rank
            raise

    def _live_ranks(self) -> list[int]:
        return [r for r in range(1, self.transport.world_size) if r not in self.absent]

    def _broadcast(self, op: Op, layer: int = 0) -> None:
        for rank in self._live_ranks():
            self._send(rank, head(op, layer))
            self._last_sent[rank] = time.monotonic()

    def heartbeat(self) -> None:
        self._broadcast(Op.HEARTBEAT)

    def stop(self) -> None:
        self._broadcast(Op.STOP)

    def release(self) -> None:
        """Best effort, before a broken group is dropped: STOP to every rank that still listens, so that
        the live ranks' loops end now rather than at their receive timeout (their actors are reused).
        Their peers are only the router: unlike a collective, no dead peer would wake them."""
        for rank in self._live_ranks():
            with contextlib.suppress(TransportError):
                self.transport.send(rank, head(Op.STOP))


class LocalExperts:
    """All shards in the router's own process: the same plan and compute with no transport.

    For single-process use and tests; a cluster uses TransportExperts.
    """

    def __init__(self, shards: list[ExpertShard], placement: ModelPlacement) -> None:
        self.shards = shards
        self.placement = placement
        self.load = ExpertLoad(placement.num_layers, placement.num_experts)
        self.stats = ExchangeStats()

    def take_stats(self) -> ExchangeStats:
        stats, self.stats = self.stats, ExchangeStats()
        return stats

    def heartbeat(self) -> None:
        return None

    def dispatch(self, layer, hidden, ids, weights, tag=0):
        plan = plan_dispatch(ids, weights, self.placement.layer(layer), self.load.offset(layer))
        self.load.add(layer, ids)
        sent = Dispatched(layer, tag, plan.token_index, [], [])
        start = 0
        for rank, (shard, count) in enumerate(zip(self.shards, plan.shard_counts, strict=True), start=1):
            if count:
                end = start + count
                rows = hidden.index_select(0, plan.token_index[start:end])
                part = shard.forward(layer, rows, plan.local_ids[start:end], plan.weights[start:end])
                sent.ranks.append(rank)
                sent.counts.append(count)
                sent.local.append(part)
                start = end
        return sent

    def combine(self, sent, out):
        start = 0
        for count, part in zip(sent.counts, sent.local, strict=True):
            out.index_add_(0, sent.token_index[start : start + count], part)
            start += count
        return out
