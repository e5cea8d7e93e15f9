"""The data plane on GPUs: NCCL through cupy, messages as grouped point-to-point calls.

The router creates the NCCL unique id and hands it to the expert actors through Ray. Every call is
enqueued on the current torch CUDA stream, so it orders with the surrounding torch kernels. NCCL
itself never times out: a watchdog thread follows each enqueued group's CUDA event and aborts
the communicator once one is overdue, which makes the stuck kernel return; the transport then raises
TransportError on its next use, so the engine re-forms the group instead of hanging.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from router.errors import TransportError
from router.transport import HEAD_LEN, ROWS


def new_unique_id() -> tuple[int, ...]:
    from cupy.cuda import nccl

    return nccl.get_unique_id()


def nccl_version() -> int:
    from cupy.cuda import nccl

    return nccl.get_version()


def _nccl_dtype(dtype: torch.dtype) -> int:
    from cupy.cuda import nccl

    table = {
        torch.float32: nccl.NCCL_FLOAT32,
        torch.float16: nccl.NCCL_FLOAT16,
        torch.bfloat16: nccl.NCCL_BFLOAT16,
        torch.int64: nccl.NCCL_INT64,
    }
    if dtype not in table:
        raise TransportError(f"NCCL transport does not carry {dtype}")
    return table[dtype]


class Watchdog:
    """Aborts a communicator when a collective it follows has not completed within `timeout_s`."""

    def __init__(self, abort: Callable[[], None], timeout_s: float, poll_s: float = 0.001) -> None:
        self._abort, self.timeout_s, self._poll_s = abort, timeout_s, poll_s
        self._pending: deque[tuple[torch.cuda.Event, float, str]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="nccl-watchdog", daemon=True)
        self._thread.start()

    def follow(self, event: torch.cuda.Event, what: str) -> None:
        with self._lock:
            self._pending.append((event, time.monotonic() + self.timeout_s, what))

    def check(self) -> None:
        if self.failure is not None:
            raise TransportError(self.failure)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            with self._lock:
                while self._pending and self._pending[0][0].query():
                    self._pending.popleft()
                head = self._pending[0] if self._pending else None
            if head is not None and time.monotonic() > head[1]:
                self.failure = f"NCCL {head[2]} not done within {self.timeout_s:.0f} s; communicator aborted"
                self._abort()
                return


class NcclTransport:
    """Point-to-point messages over one NCCL communicator: a message's head and payload go in one
    group; a recv takes the head first and syncs the host on it to learn how many rows follow."""

    def __init__(
        self, unique_id: tuple[int, ...], rank: int, world_size: int, timeout_s: float = 60.0
    ) -> None:
        from cupy.cuda import nccl

        self._nccl = nccl
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self.comm = nccl.NcclCommunicator(world_size, unique_id, rank)
        except nccl.NcclError as err:
            raise TransportError(f"NCCL communicator init failed: {err}") from err
        self.watchdog = Watchdog(self.comm.abort, timeout_s)

    def send(self, dst: int, head: list[int], payload: torch.Tensor | None = None) -> None:
        head_buf = torch.tensor(head, dtype=torch.int64).to(self.device)
        parts = [head_buf]
        if head[ROWS] > 0:
            assert payload is not None and payload.shape[0] == head[ROWS]
            parts.append(payload.contiguous())
        self._enqueue(f"send to rank {dst}", [(self.comm.send, part, dst) for part in parts])

    def recv(self, src: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        head_buf = torch.empty(HEAD_LEN, dtype=torch.int64, device=self.device)
        arrived = self._enqueue(f"recv of a head from rank {src}", [(self.comm.recv, head_buf, src)])
        arrived.synchronize()  # returns at the latest when the watchdog aborts the communicator
        self.watchdog.check()
        head = head_buf.tolist()
        payload = torch.empty(head[ROWS], width, dtype=dtype, device=self.device)
        if head[ROWS] > 0:
            self._enqueue(f"recv of {head[ROWS]} rows from rank {src}", [(self.comm.recv, payload, src)])
        return head, payload

    def _enqueue(self, what: str, ops: list[tuple[Callable, torch.Tensor, int]]) -> torch.cuda.Event:
        """Enqueues the calls as one NCCL group on the current stream; the watchdog follows it."""
        self.watchdog.check()
        stream = torch.cuda.current_stream().cuda_stream
        try:
            self._nccl.groupStart()
            for call, tensor, peer in ops:
                call(tensor.data_ptr(), tensor.numel(), _nccl_dtype(tensor.dtype), peer, stream)
            self._nccl.groupEnd()
        except (RuntimeError, self._nccl.NcclError) as err:
            self.watchdog.check()
            raise TransportError(f"NCCL {what} failed: {err}") from err
        event = torch.cuda.Event()
        event.record()
        self.watchdog.follow(event, what)
        return event

    def close(self) -> None:
        self.watchdog.close()
        if self.watchdog.failure is None:
            self.comm.destroy()
