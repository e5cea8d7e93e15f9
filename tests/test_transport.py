"""Transports on the CPU: a peer that stops answering is a TransportError within the timeout, never a hang."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cluster.transport.gloo import GlooTransport
from cluster.transport.nccl import Watchdog
from router.errors import TransportError
from tests.conftest import free_port


def test_gloo_peer_that_stalls_is_detected_within_the_timeout():
    address = f"127.0.0.1:{free_port()}"
    joined, release = threading.Event(), threading.Event()

    def stalled_expert() -> None:
        GlooTransport(address, 1, 2, timeout_s=2)  # joins the group, then never takes part again
        joined.set()
        release.wait(30)

    peer = threading.Thread(target=stalled_expert, daemon=True)
    peer.start()
    router = GlooTransport(address, 0, 2, timeout_s=2)
    joined.wait(30)
    start = time.monotonic()
    with pytest.raises(TransportError, match="gloo"):
        router.all_to_all(torch.ones(3, 4), [0, 3], [0, 0]).wait()
        router.all_to_all(torch.empty(0, 4), [0, 0], [0, 3]).wait()
    assert time.monotonic() - start < 2 + 3
    release.set()


def test_gloo_uneven_splits_and_empty_ranks():
    address = f"127.0.0.1:{free_port()}"
    received: dict[int, torch.Tensor] = {}

    def expert(rank: int) -> None:
        t = GlooTransport(address, rank, 3, timeout_s=10)
        rows = 2 if rank == 1 else 0
        received[rank] = t.all_to_all(torch.empty(0, 4), [0, 0, 0], [rows, 0, 0]).wait()

    threads = [threading.Thread(target=expert, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    router = GlooTransport(address, 0, 3, timeout_s=10)
    payload = torch.arange(8, dtype=torch.float32).view(2, 4)
    router.all_to_all(payload, [0, 2, 0], [0, 0, 0]).wait()
    for t in threads:
        t.join(20)
    assert torch.equal(received[1], payload)
    assert received[2].shape == (0, 4)


class _Completion:
    """Stands in for a CUDA event: done once `finish` is called (the watchdog only calls query())."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def finish(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()


def test_watchdog_aborts_an_overdue_collective_and_the_transport_then_raises():
    aborted = threading.Event()
    dog = Watchdog(aborted.set, timeout_s=0.3)
    done, stuck = _Completion(), _Completion()
    dog.follow(done, "header broadcast")
    done.finish()
    dog.follow(stuck, "all_to_all")
    assert aborted.wait(5), "the overdue collective was not aborted"
    with pytest.raises(TransportError, match="all_to_all not done within"):
        dog.check()
    dog.close()


def test_watchdog_leaves_collectives_that_complete_in_time():
    aborted = threading.Event()
    dog = Watchdog(aborted.set, timeout_s=0.5)
    for _ in range(20):
        op = _Completion()
        dog.follow(op, "all_to_all")
        op.finish()
    assert not aborted.wait(1.0), "a collective that completed in time was aborted"
    dog.check()
    dog.close()
