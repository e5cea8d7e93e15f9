"""The shared-memory transport between real processes: message shapes, order, large payloads, and a
peer that dies or stalls inside a wait (a TransportError within the timeout, never a hang)."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from cluster.transport.shm import DEDICATED_SPIN_S, SPIN_S, ShmTransport, new_prefix
from cluster.transport.shm_ring import MIN_PIECE
from router.errors import TransportError
from router.transport import LAYER, OP, ROWS, TAG, Op, head

WIDTH = 24
SMALL_RING = 4 * MIN_PIECE
_ctx = mp.get_context("spawn")


def _rows(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.arange(n * width, dtype=torch.float32).view(n, width) + 1000 * seed


def _echo(prefix: str, rank: int, world: int, ready, ring_bytes: int) -> None:
    """Answers every DISPATCH with a COMBINE of the same head and payload + rank, until STOP."""
    ready.set()
    t = ShmTransport(prefix, rank, world, [0], timeout_s=30, ring_bytes=ring_bytes)
    while True:
        got, rows = t.recv(0, WIDTH, torch.float32)
        if got[OP] == Op.STOP:
            break
        t.send(0, head(Op.COMBINE, got[LAYER], got[ROWS], got[TAG]), rows + rank)
    t.close()


def _send_two_then_close(prefix: str, rank: int, world: int, ready) -> None:
    """A rank that only sends: two messages, then it closes before the router has read them."""
    ready.set()
    t = ShmTransport(prefix, rank, world, [0], timeout_s=30)
    t.send(0, head(Op.COMBINE, 7, 2, 1), _rows(2, rank))
    t.send(0, head(Op.COMBINE, 8, 0, 1))
    t.close()


def _wait_forever(prefix: str, rank: int, world: int, ready) -> None:
    """Joins, then waits inside recv for a message that never comes."""
    ready.set()
    t = ShmTransport(prefix, rank, world, [0], timeout_s=600)
    t.recv(0, WIDTH, torch.float32)


def _close_at_once(prefix: str, rank: int, world: int, ready) -> None:
    ready.set()
    ShmTransport(prefix, rank, world, [0], timeout_s=30).close()


@contextmanager
def _peers(target, prefix: str, ranks: list[int], world: int, *args) -> Iterator[list[mp.Process]]:
    """Starts one spawned process per rank and returns once each has imported and is about to join."""
    procs = []
    for rank in ranks:
        ready = _ctx.Event()
        proc = _ctx.Process(target=target, args=(prefix, rank, world, ready, *args), daemon=True)
        proc.start()
        assert ready.wait(120), f"rank {rank} never started"
        procs.append(proc)
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.join(30)


def _segments(prefix: str) -> list[str]:
    return glob.glob(f"/dev/shm/{prefix}*")


def test_uneven_and_empty_messages_a_rank_that_receives_nothing_and_cleanup():
    prefix = new_prefix()
    with (
        _peers(_echo, prefix, [1], 3, SMALL_RING) as (echo,),
        _peers(_send_two_then_close, prefix, [2], 3),
    ):
        router = ShmTransport(prefix, 0, 3, timeout_s=30)
        assert _segments(prefix) == [], "a segment outlived the join"
        sizes = [3, 0, 1, 17, 0]
        for layer, n in enumerate(sizes):
            router.send(1, head(Op.DISPATCH, layer, n, 0), _rows(n, layer) if n else None)
        for layer, n in enumerate(sizes):
            got, rows = router.recv(1, WIDTH, torch.float32)
            assert got == head(Op.COMBINE, layer, n, 0)
            assert torch.equal(rows, _rows(n, layer) + 1)
        # rank 2 received nothing; what it sent before closing still arrives, in order
        got, rows = router.recv(2, WIDTH, torch.float32)
        assert got == head(Op.COMBINE, 7, 2, 1) and torch.equal(rows, _rows(2, 2))
        got, rows = router.recv(2, WIDTH, torch.float32)
        assert got == head(Op.COMBINE, 8, 0, 1) and rows.shape == (0, WIDTH)
        with pytest.raises(TransportError, match="rank 2 closed"):
            router.recv(2, WIDTH, torch.float32)
        router.send(1, head(Op.STOP))
        echo.join(30)
        assert echo.exitcode == 0
        router.close()
    assert _segments(prefix) == []


def test_payloads_larger_than_the_ring_both_ways_while_both_sides_have_queued_sends():
    prefix = new_prefix()
    with _peers(_echo, prefix, [1], 2, SMALL_RING) as (echo,):
        router = ShmTransport(prefix, 0, 2, timeout_s=30, ring_bytes=SMALL_RING)
        big = [
            _rows(n, i) for i, n in enumerate([20_000, 3, 15_000])
        ]  # 1.9 MB and 1.4 MB rows vs a 256 KiB ring
        for i, rows in enumerate(big):  # all sent before any answer is read: the sends must not block
            router.send(1, head(Op.DISPATCH, i, rows.shape[0], i % 2), rows)
        for i, rows in enumerate(big):
            got, answer = router.recv(1, WIDTH, torch.float32)
            assert got == head(Op.COMBINE, i, rows.shape[0], i % 2)
            assert torch.equal(answer, rows + 1)
        router.send(1, head(Op.STOP))
        echo.join(30)
        assert echo.exitcode == 0
        router.close()


def test_two_micro_batches_interleaved_keep_fifo_order_per_pair():
    prefix = new_prefix()
    with _peers(_echo, prefix, [1, 2], 3, SMALL_RING):
        router = ShmTransport(prefix, 0, 3, timeout_s=30)
        sent: dict[int, list[tuple[list[int], torch.Tensor]]] = {1: [], 2: []}
        for layer in range(40):
            for tag in (0, 1):  # micro-batch A then B of the same layer, to both ranks, varied sizes
                for rank in (1, 2):
                    n = (layer * 7 + tag * 3 + rank) % 11
                    rows = _rows(n, layer * 10 + tag)
                    router.send(rank, head(Op.DISPATCH, layer, n, tag), rows)
                    sent[rank].append((head(Op.COMBINE, layer, n, tag), rows + rank))
            if layer % 3 == 2:  # drain now and then, answers of the two ranks read alternately
                for rank in (2, 1):
                    while sent[rank]:
                        expected, rows = sent[rank].pop(0)
                        got, answer = router.recv(rank, WIDTH, torch.float32)
                        assert got == expected and torch.equal(answer, rows)
        for rank in (1, 2):
            for expected, rows in sent[rank]:
                got, answer = router.recv(rank, WIDTH, torch.float32)
                assert got == expected and torch.equal(answer, rows)
            router.send(rank, head(Op.STOP))
        router.close()


@pytest.mark.parametrize("spin_s", [SPIN_S, DEDICATED_SPIN_S])
def test_a_peer_sigkilled_inside_a_wait_is_a_transport_error_well_within_the_timeout(spin_s):
    prefix = new_prefix()
    with _peers(_wait_forever, prefix, [1], 2) as (peer,):
        router = ShmTransport(prefix, 0, 2, timeout_s=30, spin_s=spin_s)
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            os.kill(peer.pid, signal.SIGKILL)

        timer = threading.Timer(0.3, kill)  # the router is asleep in its wait by then
        timer.start()
        with pytest.raises(TransportError, match=rf"rank 1 \(pid {peer.pid}\) died"):
            router.recv(1, WIDTH, torch.float32)
        detected_after = time.monotonic() - killed_at[0]
        print(f"SIGKILLed peer detected after {detected_after * 1e3:.1f} ms")
        assert detected_after < 1.0
        router.close()
    assert _segments(prefix) == []


def test_a_sigstopped_peer_is_a_transport_error_within_the_timeout():
    prefix = new_prefix()
    with _peers(_wait_forever, prefix, [1], 2) as (peer,):
        router = ShmTransport(prefix, 0, 2, timeout_s=1.5)
        os.kill(peer.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(TransportError, match=r"no message from rank 1 within 1\.5 s"):
            router.recv(1, WIDTH, torch.float32)
        assert 1.5 <= time.monotonic() - start < 1.5 + 1.0
        router.close()


def test_a_peer_that_closes_fails_the_wait_at_once():
    prefix = new_prefix()
    with _peers(_close_at_once, prefix, [1], 2):
        router = ShmTransport(prefix, 0, 2, timeout_s=30)
        start = time.monotonic()
        with pytest.raises(TransportError, match="rank 1 closed"):
            router.recv(1, WIDTH, torch.float32)
        assert time.monotonic() - start < 1.0
        with pytest.raises(TransportError, match="rank 1 closed"):
            router.send(1, head(Op.HEARTBEAT))
        router.close()


def test_a_peer_that_never_joins_is_an_error_and_leaves_no_segment():
    prefix = new_prefix()
    with pytest.raises(TransportError, match="rank 1 did not join"):
        ShmTransport(prefix, 0, 2, timeout_s=0.3)
    assert _segments(prefix) == []
    with pytest.raises(TransportError, match="rank 0 never created"):
        ShmTransport(new_prefix(), 1, 2, timeout_s=0.3)


def test_random_sizes_through_a_small_ring_wrap_and_split_without_losing_a_byte():
    """Two threads of one process (the ring does not care): sizes from empty to 1.5 rings, so records
    wrap at every offset and large ones stream through in pieces."""
    prefix = new_prefix()
    sizes = torch.randint(
        0, int(1.5 * SMALL_RING) // (4 * WIDTH), (300,), generator=torch.Generator().manual_seed(0)
    )
    sizes[::7] = 0
    answers: list[tuple[list[int], torch.Tensor]] = []

    def expert() -> None:
        t = ShmTransport(prefix, 1, 2, timeout_s=30, ring_bytes=SMALL_RING)
        for _ in sizes:
            got, rows = t.recv(0, WIDTH, torch.float32)
            answers.append((got, rows.clone()))
        t.send(0, head(Op.COMBINE))
        t.close()

    thread = threading.Thread(target=expert, daemon=True)
    thread.start()
    router = ShmTransport(prefix, 0, 2, timeout_s=30, ring_bytes=SMALL_RING)
    for i, n in enumerate(sizes.tolist()):
        router.send(1, head(Op.DISPATCH, i, n, i % 2), _rows(n, i) if n else None)
    got, _ = router.recv(1, WIDTH, torch.float32)  # what did not fit is written while this rank waits
    assert got == head(Op.COMBINE)
    thread.join(30)
    assert [got for got, _ in answers] == [
        head(Op.DISPATCH, i, n, i % 2) for i, n in enumerate(sizes.tolist())
    ]
    for i, (_, rows) in enumerate(answers):
        assert torch.equal(rows, _rows(sizes[i].item(), i))
    router.close()


def test_a_payload_read_with_the_wrong_width_is_a_clear_error():
    prefix = new_prefix()
    opened: list[ShmTransport] = []
    joined = threading.Thread(target=lambda: opened.append(ShmTransport(prefix, 1, 2, timeout_s=30)))
    joined.start()
    router = ShmTransport(prefix, 0, 2, timeout_s=30)
    joined.join(30)
    (expert,) = opened
    router.send(1, head(Op.DISPATCH, 0, 3, 0), _rows(3, 0))
    with pytest.raises(TransportError, match=rf"sent {3 * WIDTH * 4} payload bytes .* expected 3 rows of 12"):
        expert.recv(0, 12, torch.float32)
    with pytest.raises(ValueError, match="head says 2 rows"):
        router.send(1, head(Op.DISPATCH, 0, 2, 0), _rows(3, 0))
    router.close()
    expert.close()
