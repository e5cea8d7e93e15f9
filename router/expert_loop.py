"""An expert rank's side of the exchange: receive a DISPATCH, compute, send its COMBINE, in order.

There is no step: a rank serves whatever (MoE layer, micro-batch) arrives next, so two micro-batches
interleave on it as the router sent them, and a rank that owns none of a layer's routed experts hears
nothing for it. HEARTBEATs keep an idle rank's receive from timing out; a FLUSH is echoed (the router
drains stale answers with it after losing another rank); STOP ends the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from experts.shard import ExpertShard
from router.errors import TransportError
from router.exchange import row_width, unpack_rows
from router.transport import LAYER, OP, ROUTER_RANK, ROWS, TAG, Op, Transport, head


@dataclass
class ExpertStats:
    """An expert rank's counters, accumulated over its loop."""

    dispatches: int = 0  # DISPATCH messages served
    rows: int = 0  # token rows received, over all MoE layers
    compute_seconds: float = 0.0  # in the shard's expert forward


def run_expert_loop(
    transport: Transport,
    shard: ExpertShard,
    top_k: int,
    dtype: torch.dtype,
    on_dispatch: Callable[[ExpertStats], None] | None = None,
    on_switch: Callable[[int], ExpertShard] | None = None,
    stats: ExpertStats | None = None,
) -> int:
    """Serves the router until STOP; returns the DISPATCH messages this loop served.

    `on_dispatch` gets the rank's counters after every one (metrics, which throttle themselves);
    `on_switch(version)` returns the shard to compute with from a SWITCH on (the slots prepared for it);
    `stats`: the counters to add to (an actor's, over all the loops it runs), else new ones.
    """
    stats = ExpertStats() if stats is None else stats
    served_before = stats.dispatches
    width = row_width(shard.hidden_size, top_k, dtype)
    while True:
        got, payload = transport.recv(ROUTER_RANK, width, dtype)
        if got[OP] == Op.STOP:
            return stats.dispatches - served_before
        if got[OP] == Op.HEARTBEAT:
            continue
        if got[OP] == Op.SWITCH and on_switch is not None:
            shard = on_switch(got[LAYER])
            continue
        if got[OP] == Op.FLUSH:
            transport.send(ROUTER_RANK, head(Op.FLUSH))
            continue
        if got[OP] != Op.DISPATCH:
            raise TransportError(f"expert rank {transport.rank} got an unexpected message {got}")
        hidden, local_ids, weights = unpack_rows(payload, shard.hidden_size, top_k)
        started = time.perf_counter()
        out = shard.forward(got[LAYER], hidden, local_ids, weights)
        stats.compute_seconds += time.perf_counter() - started
        stats.rows += got[ROWS]
        stats.dispatches += 1
        transport.send(ROUTER_RANK, head(Op.COMBINE, got[LAYER], got[ROWS], got[TAG]), out)
        if on_dispatch is not None:
            on_dispatch(stats)
