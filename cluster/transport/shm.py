"""The data plane between ranks on one host: a ring buffer per ordered rank pair in /dev/shm.

A send copies the message into the ring and returns; what does not fit yet stays queued and is
written while this rank waits in a later recv (so a send never blocks and two ranks sending large
messages to each other cannot deadlock). A recv returns a view of the ring when the message arrived
in one piece, and otherwise assembles the pieces into a new tensor while the writer streams them.

Waiting spins, then sleeps on a futex in slices. The spin is a few tens of microseconds where ranks may
share cores, and 2 ms where each has one of its own (`spin_s`, chosen by cluster/transport/group.py):
at one sequence the answer to a dispatch is about a layer's expert compute away (~1 ms here), and the
sleep and wake-up that a short spin ends in cost more than spinning on a core nothing else uses. Each
slice of the sleep checks that the peer is alive (a pidfd, so a SIGKILLed peer is seen within one
slice) and has not closed its side, and the whole wait fails after timeout_s.
One thread drives a transport at a time.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque

import torch

import cluster.transport.futex as futex
from cluster.transport.shm_ring import FIRST, MORE, Outgoing, PairSegment
from router.errors import TransportError
from router.transport import HEAD_LEN, ROWS

RING_BYTES = 4 << 20  # per direction of each pair
SPIN_S = 50e-6
DEDICATED_SPIN_S = 2e-3
SLICE_S = 0.02  # how often a sleeping wait checks its peer
PUMP_SLICE_S = 0.001  # ... while it still has queued bytes to write
_EMPTY = torch.empty(0, dtype=torch.uint8)


def new_prefix() -> str:
    """A segment name prefix unique to one group, so a re-formed group never maps an old one's rings."""
    return f"moe-{uuid.uuid4().hex[:16]}"


class ShmTransport:
    def __init__(
        self,
        prefix: str,
        rank: int,
        world_size: int,
        peers: list[int] | None = None,
        timeout_s: float = 60.0,
        ring_bytes: int = RING_BYTES,
        spin_s: float = SPIN_S,
    ) -> None:
        """Joins the pairs between `rank` and each of `peers` (default: every other rank)."""
        self.rank, self.world_size = rank, world_size
        self.spin_s = spin_s
        self.device = torch.device("cpu")
        self.timeout_s = timeout_s
        peers = [p for p in range(world_size) if p != rank] if peers is None else list(peers)
        deadline = time.monotonic() + timeout_s
        self._pairs: dict[int, PairSegment] = {}
        try:
            for peer in sorted(peers, key=lambda p: p < rank):  # the segments this rank creates first
                self._pairs[peer] = PairSegment(prefix, rank, peer, ring_bytes, deadline)
            for pair in self._pairs.values():
                pair.connect(deadline)
        except BaseException:
            self.close()
            raise
        self._out: dict[int, deque[Outgoing]] = {peer: deque() for peer in peers}

    def send(self, dst: int, head: list[int], payload: torch.Tensor | None = None) -> None:
        pair = self._pair(dst)
        if len(head) != HEAD_LEN:
            raise ValueError(f"a head has {HEAD_LEN} ints, got {head}")
        if pair.peer_closed():
            raise TransportError(f"rank {dst} closed its shared-memory transport")
        rows = head[ROWS]
        data = _EMPTY
        if rows > 0:
            if payload is None or payload.shape[0] != rows or payload.device.type != "cpu":
                raise ValueError(f"head says {rows} rows; the payload must be a CPU tensor of that many rows")
            data = payload.reshape(-1).view(torch.uint8)
        self._out[dst].append(Outgoing(list(head), data))
        self._pump(dst)

    def recv(self, src: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        pair = self._pair(src)
        ring = pair.in_ring
        ring.release()
        self._nudge(pair)
        kind, piece, total, head, offset = self._next_record(pair)
        rows = head[ROWS]
        expected = rows * width * dtype.itemsize
        if kind != FIRST or total != expected:
            raise TransportError(
                f"rank {src} sent {total} payload bytes for head {head}; "
                f"expected {rows} rows of {width} {dtype}"
            )
        if piece == total:
            ring.pass_record(piece, hold=True)
            return head, ring.piece(offset, total).view(dtype).view(rows, width)
        out = torch.empty(total, dtype=torch.uint8)
        got = 0
        while True:
            out[got : got + piece].copy_(ring.piece(offset, piece))
            got += piece
            ring.pass_record(piece, hold=False)
            self._nudge(pair)
            if got == total:
                return head, out.view(dtype).view(rows, width)
            kind, piece, _, _, offset = self._next_record(pair)
            if kind != MORE:
                raise TransportError(f"rank {src} started a new message inside one of {total} bytes")

    def close(self) -> None:
        for pair in self._pairs.values():
            pair.close()
        self._pairs = {}
        self._out = {}

    def _pair(self, peer: int) -> PairSegment:
        pair = self._pairs.get(peer)
        if pair is None:
            raise TransportError(f"rank {self.rank} has no shared-memory pair with rank {peer} (closed?)")
        return pair

    def _pump(self, peer: int) -> None:
        queue, ring = self._out[peer], self._pairs[peer].out_ring
        while queue and ring.write(queue[0]):
            queue.popleft()

    def _pump_all(self) -> bool:
        """Writes what queued messages now fit; True if some are still queued."""
        queued = False
        for peer, queue in self._out.items():
            if queue:
                self._pump(peer)
                queued = queued or bool(queue)
        return queued

    @staticmethod
    def _nudge(pair: PairSegment) -> None:
        """The peer's queued message may fit now: wake it where it sleeps if it waits on this pair."""
        if pair.in_ring.writer_waits_for_room():
            futex.wake(pair.out_ring.write_address)

    def _next_record(self, pair: PairSegment) -> tuple[int, int, int, list[int], int]:
        while True:
            record = pair.in_ring.next_record()
            if record is not None:
                return record
            self._wait(pair)

    def _wait(self, pair: PairSegment) -> None:
        ring = pair.in_ring
        spin_end = time.perf_counter() + self.spin_s
        while time.perf_counter() < spin_end:
            if ring.ready():
                return
            self._pump_all()
            os.sched_yield()
        deadline = time.monotonic() + self.timeout_s
        while not ring.ready():
            ring.wait(PUMP_SLICE_S if self._pump_all() else SLICE_S)
            if ring.ready():
                return
            if pair.peer_closed():
                raise TransportError(f"rank {pair.peer} closed its shared-memory transport")
            if not pair.peer_alive():
                raise TransportError(f"rank {pair.peer} (pid {pair.peer_pid}) died")
            if time.monotonic() > deadline:
                raise TransportError(f"no message from rank {pair.peer} within {self.timeout_s:g} s")
