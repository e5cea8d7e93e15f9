"""Transports on the CPU: gloo over point-to-point messages, the transport chosen per pair of ranks and
how long its waits spin, and a peer that stops answering is a TransportError within the timeout, never
a hang."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from cluster.instance.resources import reservations_fit_cores
from cluster.transport.gloo import GlooTransport
from cluster.transport.group import new_rendezvous, open_transport
from cluster.transport.nccl import Watchdog
from cluster.transport.per_peer import PerPeerTransport
from cluster.transport.shm import DEDICATED_SPIN_S, SPIN_S, ShmTransport
from router.errors import TransportError
from router.transport import Op, head
from tests.conftest import free_port


def _in_threads(*targets) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def test_gloo_peer_that_stalls_is_detected_within_the_timeout():
    address = f"127.0.0.1:{free_port()}"
    joined, release = threading.Event(), threading.Event()

    def stalled_expert() -> None:
        stalled = GlooTransport(address, 1, 2, timeout_s=2)  # joins the group, then never takes part again
        joined.set()
        release.wait(30)
        stalled.close()

    _in_threads(stalled_expert)
    router = GlooTransport(address, 0, 2, timeout_s=2)
    assert joined.wait(30)
    router.send(1, head(Op.DISPATCH, 0, 3), torch.ones(3, 4))  # a send does not wait for the peer
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"gloo recv from rank 1 .*[Tt]imed out"):
        router.recv(1, 4, torch.float32)
    assert time.monotonic() - start < 2 + 3
    release.set()


def test_gloo_uneven_and_empty_messages_in_order_and_a_rank_that_receives_nothing():
    address = f"127.0.0.1:{free_port()}"
    received: dict[int, list] = {1: [], 2: []}
    finished = threading.Event()  # a gloo rank that goes away may reset what it has not yet delivered

    def expert(rank: int, messages: int) -> None:
        t = GlooTransport(address, rank, 3, timeout_s=10)
        for _ in range(messages):
            received[rank].append(t.recv(0, 4, torch.float32))
        t.send(0, head(Op.COMBINE, 5, 0, 1))
        finished.wait(30)
        t.close()

    threads = _in_threads(lambda: expert(1, 3), lambda: expert(2, 0))
    router = GlooTransport(address, 0, 3, timeout_s=10)
    payload = torch.arange(8, dtype=torch.float32).view(2, 4)
    router.send(1, head(Op.DISPATCH, 0, 2, 0), payload)
    router.send(1, head(Op.DISPATCH, 0, 0, 1))
    router.send(1, head(Op.DISPATCH, 1, 1, 0), payload[1:])
    for rank in (2, 1):
        assert router.recv(rank, 4, torch.float32)[0] == head(Op.COMBINE, 5, 0, 1)
    finished.set()
    for t in threads:
        t.join(20)
    (h0, p0), (h1, p1), (h2, p2) = received[1]
    assert (h0, h1, h2) == (
        head(Op.DISPATCH, 0, 2, 0),
        head(Op.DISPATCH, 0, 0, 1),
        head(Op.DISPATCH, 1, 1, 0),
    )
    assert torch.equal(p0, payload) and p1.shape == (0, 4) and torch.equal(p2, payload[1:])
    assert received[2] == []


def test_the_rendezvous_chooses_shm_within_the_routers_node_and_gloo_beyond():
    mixed = new_rendezvous("auto", ["n0", "n0", "n1", "n0", "n2"])
    assert mixed.shm_ranks == (0, 1, 3) and mixed.shm_prefix is not None
    assert mixed.gloo_ranks == (0, 2, 4) and mixed.gloo_address is not None
    one_node = new_rendezvous("auto", ["n0", "n0", "n0"])
    assert one_node.gloo_ranks == () and one_node.gloo_address is None
    assert new_rendezvous("auto", ["n0", "n0"]).shm_prefix != one_node.shm_prefix  # one name per group
    assert not one_node.dedicated_cores and new_rendezvous("auto", ["n0", "n0"], True).dedicated_cores
    forced = new_rendezvous("gloo", ["n0", "n0", "n0"])
    assert forced.shm_prefix is None and forced.gloo_ranks == (0, 1, 2)
    with pytest.raises(ValueError, match=r"transport=shm, but expert ranks \[2\] are on other nodes"):
        new_rendezvous("shm", ["n0", "n0", "n1"])


def test_a_mixed_group_reaches_each_peer_over_its_own_transport():
    rendezvous = replace(new_rendezvous("auto", ["n0", "n0", "n1"]), gloo_address=f"127.0.0.1:{free_port()}")
    opened: dict[int, object] = {}
    finished = threading.Event()

    def expert(rank: int) -> None:
        t = opened[rank] = open_transport(rendezvous, rank, 3, timeout_s=20)
        got, rows = t.recv(0, 4, torch.float32)
        t.send(0, head(Op.COMBINE, got[1], got[2], got[3]), rows * rank)
        finished.wait(30)
        t.close()

    threads = _in_threads(lambda: expert(1), lambda: expert(2))
    router = open_transport(rendezvous, 0, 3, timeout_s=20)
    rows = torch.arange(12, dtype=torch.float32).view(3, 4)
    for rank in (1, 2):
        router.send(rank, head(Op.DISPATCH, 4, 3, rank % 2), rows)
    for rank in (2, 1):
        got, answer = router.recv(rank, 4, torch.float32)
        assert got == head(Op.COMBINE, 4, 3, rank % 2) and torch.equal(answer, rows * rank)
    finished.set()
    for t in threads:
        t.join(20)
    assert isinstance(router, PerPeerTransport)
    assert isinstance(opened[1], ShmTransport)  # shares the router's node
    assert opened[1].spin_s == SPIN_S  # ranks that may share cores spin briefly
    assert isinstance(opened[2], PerPeerTransport)  # gloo, as rank 1 of the router's 2-rank gloo group
    router.close()


@pytest.mark.parametrize(("dedicated", "spin_s"), [(False, SPIN_S), (True, DEDICATED_SPIN_S)])
def test_ranks_with_cores_of_their_own_spin_longer_in_a_wait(dedicated, spin_s):
    rendezvous = new_rendezvous("auto", ["n0", "n0"], dedicated_cores=dedicated)
    opened: dict[int, object] = {}
    threads = _in_threads(lambda: opened.setdefault(1, open_transport(rendezvous, 1, 2, timeout_s=20)))
    router = open_transport(rendezvous, 0, 2, timeout_s=20)
    for t in threads:
        t.join(20)
    assert router.spin_s == opened[1].spin_s == spin_s
    router.close()
    opened[1].close()


@pytest.mark.parametrize(
    ("reserved", "advertised", "cores", "dedicated"),
    [
        ([1, 1], 2, 2, True),  # a router and an expert actor on a 2-core node
        ([1, 1], 3, 2, False),  # Ray told of 3 CPUs on 2 cores: two reservations share one
        ([0.5, 1], 2, 2, False),  # a fractional reservation shares its core
        ([2, 1], 16, 16, True),
    ],
)
def test_cores_are_dedicated_where_every_reservation_is_a_whole_core_of_the_node(
    reserved, advertised, cores, dedicated
):
    assert reservations_fit_cores(reserved, advertised, cores) is dedicated


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
