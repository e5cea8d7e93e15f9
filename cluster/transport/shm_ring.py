"""One shared-memory segment per rank pair: a control page and a ring buffer per direction.

The lower rank creates the segment under a temporary name and renames it into place once initialised;
the higher rank maps it, writes its pid and unlinks the name, so once both are attached nothing is left
in /dev/shm even if both are SIGKILLed later. The creator unlinks it as well when the peer never comes.

A ring carries records aligned to 64 bytes: a 64-byte record header (kind, piece bytes, message bytes,
the message head) and then a piece of the payload. A message is one FIRST record and, when the payload
did not fit in one contiguous piece, MORE records; a WRAP record sends the reader back to offset 0.
Positions are byte counts since the start (never wrapped); the low 32 bits of the write position are
the futex word a waiting reader sleeps on.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time
from dataclasses import dataclass

import torch

import cluster.transport.futex as futex
from router.errors import TransportError
from router.transport import HEAD_LEN

SHM_DIR = "/dev/shm"
MAGIC = 0x6D6F652D73686D31  # "moe-shm1"
CONTROL_BYTES = 4096
RECORD = 64  # record header bytes and alignment
FIRST, MORE, WRAP = 1, 2, 3
MIN_PIECE = 64 * 1024  # a message is split into pieces no smaller than this (unless it is smaller)
_RECORD_FMT = f"<{RECORD // 8}q"
# Control words (u64 index): magic, ring bytes, creator pid, joiner pid, closed by creator / joiner,
# then per direction d a cache line each for its write position, read position and waiting flags.
_MAGIC, _RING_BYTES, _PID0, _PID1, _CLOSED0, _CLOSED1 = range(6)


def _align(n: int) -> int:
    return -(-n // RECORD) * RECORD


@dataclass
class Outgoing:
    """A message being written, maybe over several pieces while the reader frees room."""

    head: list[int]
    data: torch.Tensor  # flat uint8
    sent: int = 0
    started: bool = False


class Ring:
    """One direction of a pair segment, seen from its writer or its reader."""

    def __init__(self, words: memoryview, data: torch.Tensor, data_mv: memoryview, base: int, direction: int):
        self._words, self._data, self._data_mv, self.capacity = words, data, data_mv, data.numel()
        line = 8 * (2 + 3 * direction)
        self._w, self._r, self._flags = line, line + 8, line + 16  # flags: reader waiting, writer stuck
        self.write_address = base + 8 * self._w
        self._held = 0  # reader: where the read position moves at the next recv (a view was handed out)

    # -- writer side
    def write(self, msg: Outgoing) -> bool:
        """Writes as much of `msg` as the ring has room for; True once all of it is written."""
        words, cap = self._words, self.capacity
        total = msg.data.numel()
        while True:
            w = words[self._w]
            free = cap - (w - words[self._r])
            offset = w % cap
            tail = cap - offset
            remaining = total - msg.sent
            need = RECORD + _align(min(remaining, MIN_PIECE))
            whole = RECORD + _align(remaining)
            contiguous = min(free, tail)
            after_wrap = max(0, free - tail)  # contiguous room from offset 0 once the tail is skipped
            if after_wrap >= need and (contiguous < need or contiguous < whole <= after_wrap):
                self._record(offset, WRAP, 0, 0, [0] * HEAD_LEN)
                self._publish(w + tail)
                continue
            if contiguous < need:
                words[self._flags + 1] = 1
                return False
            piece = min(remaining, contiguous - RECORD)
            self._record(offset, MORE if msg.started else FIRST, piece, total, msg.head)
            if piece:
                start = offset + RECORD
                self._data[start : start + piece].copy_(msg.data[msg.sent : msg.sent + piece])
            msg.sent += piece
            msg.started = True
            self._publish(w + RECORD + _align(piece))
            if msg.sent == total:
                words[self._flags + 1] = 0
                return True

    def _record(self, offset: int, kind: int, piece: int, total: int, head: list[int]) -> None:
        fields = [kind, piece, total, *head]
        struct.pack_into(_RECORD_FMT, self._data_mv, offset, *fields, *[0] * (RECORD // 8 - len(fields)))

    def _publish(self, position: int) -> None:
        futex.fence()  # the record is written before the position says so (aarch64 reorders stores)
        self._words[self._w] = position
        futex.fence()
        if self._words[self._flags]:
            futex.wake(self.write_address)

    # -- reader side
    def release(self) -> None:
        """Frees the message whose payload view the last recv handed out."""
        if self._held:
            self._consume(self._held)
            self._held = 0

    def ready(self) -> bool:
        return self._words[self._w] != self._words[self._r]

    def next_record(self) -> tuple[int, int, int, list[int], int] | None:
        """(kind, piece bytes, message bytes, head, payload offset) of the next record; skips WRAPs."""
        while self.ready():
            futex.fence()  # read the record only after the position that announced it
            r = self._words[self._r]
            offset = r % self.capacity
            kind, piece, total, *rest = struct.unpack_from(_RECORD_FMT, self._data_mv, offset)
            if kind != WRAP:
                return kind, piece, total, rest[:HEAD_LEN], offset + RECORD
            self._consume(r + self.capacity - offset)
        return None

    def piece(self, offset: int, nbytes: int) -> torch.Tensor:
        return self._data[offset : offset + nbytes]

    def pass_record(self, piece: int, hold: bool) -> None:
        """Moves past the record just read, now, or (hold) at the next release()."""
        end = self._words[self._r] + RECORD + _align(piece)
        if hold:
            self._held = end
        else:
            self._consume(end)

    def _consume(self, position: int) -> None:
        self._words[self._r] = position

    def wait(self, timeout_s: float) -> None:
        """Sleeps until the writer publishes (or timeout_s); the caller re-checks ready()."""
        self._words[self._flags] = 1
        futex.fence()
        seen = self._words[self._w]
        if seen == self._words[self._r]:
            futex.wait(self.write_address, seen, timeout_s)
        self._words[self._flags] = 0

    def writer_waits_for_room(self) -> bool:
        """True while the writer has a message that did not fit (it polls; a wake makes it look now)."""
        futex.fence()
        return bool(self._words[self._flags + 1])


class PairSegment:
    """The segment shared by `rank` and `peer`; `rings[0]` goes lower rank -> higher rank."""

    def __init__(self, prefix: str, rank: int, peer: int, ring_bytes: int, deadline: float) -> None:
        """Creates the segment (lower rank) or maps it once it exists (higher rank); `connect` then
        waits for the other side. Every rank creates its segments before joining any, so none waits on
        a segment that is not being created."""
        if not futex.available():
            raise TransportError("the shared-memory transport needs Linux futexes on x86_64 or aarch64")
        self.rank, self.peer = rank, peer
        self.creator = rank < peer
        self.path = os.path.join(SHM_DIR, f"{prefix}-{min(rank, peer)}-{max(rank, peer)}")
        self._mm = self._create(ring_bytes) if self.creator else self._open(deadline)
        self.words = memoryview(self._mm).cast("Q")
        self._pidfd: int | None = None

    def connect(self, deadline: float) -> None:
        raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        base = raw.data_ptr()
        if self.creator:
            self._await_joiner(base, deadline)
        else:
            self.words[_PID1] = os.getpid()
            futex.wake(base + 8 * _PID1)
            self.unlink()
        ring_bytes = int(self.words[_RING_BYTES])
        rings = []
        for d in (0, 1):
            start = CONTROL_BYTES + d * ring_bytes
            data_mv = memoryview(self._mm)[start : start + ring_bytes]
            rings.append(Ring(self.words, raw[start : start + ring_bytes], data_mv, base, d))
        self.out_ring, self.in_ring = (rings[0], rings[1]) if self.creator else (rings[1], rings[0])
        self.peer_pid = int(self.words[_PID1 if self.creator else _PID0])
        self._pidfd = self._open_pidfd(self.peer_pid)

    def _create(self, ring_bytes: int) -> mmap.mmap:
        if ring_bytes < 4 * MIN_PIECE or ring_bytes % RECORD:
            raise ValueError(f"ring_bytes must be a multiple of {RECORD} and >= {4 * MIN_PIECE}")
        size = CONTROL_BYTES + 2 * ring_bytes
        staging = self.path + ".init"
        fd = os.open(staging, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # a full /dev/shm is an error here, not a SIGBUS later
            mm = mmap.mmap(fd, size)
        except OSError as err:
            os.unlink(staging)
            raise TransportError(f"cannot allocate {size} bytes in {SHM_DIR}: {err}") from err
        finally:
            os.close(fd)
        words = memoryview(mm).cast("Q")
        words[_RING_BYTES], words[_PID0], words[_MAGIC] = ring_bytes, os.getpid(), MAGIC
        words.release()
        os.rename(staging, self.path)
        return mm

    def _open(self, deadline: float) -> mmap.mmap:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR)
                break
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise TransportError(f"rank {self.peer} never created {self.path}") from None
                time.sleep(0.001)
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if struct.unpack_from("<Q", mm, 8 * _MAGIC)[0] != MAGIC:
            raise TransportError(f"{self.path} is not a moe-cluster shared-memory segment")
        return mm

    def _await_joiner(self, base: int, deadline: float) -> None:
        while not self.words[_PID1]:
            if time.monotonic() > deadline:
                self.unlink()
                raise TransportError(f"rank {self.peer} did not join {self.path} in time")
            futex.wait(base + 8 * _PID1, 0, 0.05)
        self.unlink()

    @staticmethod
    def _open_pidfd(pid: int) -> int:
        try:
            return os.pidfd_open(pid)
        except OSError as err:
            raise TransportError(f"cannot watch peer pid {pid}: {err}") from err

    def peer_alive(self) -> bool:
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return not poller.poll(0)

    def peer_closed(self) -> bool:
        return bool(self.words[_CLOSED1 if self.creator else _CLOSED0])

    def unlink(self) -> None:
        for path in (self.path, self.path + ".init"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Marks this side closed and wakes the peer, so that it fails now rather than at its timeout."""
        self.words[_CLOSED0 if self.creator else _CLOSED1] = 1
        if self._pidfd is not None:
            futex.wake(self.out_ring.write_address)
            os.close(self._pidfd)
            self._pidfd = None
        self.unlink()
