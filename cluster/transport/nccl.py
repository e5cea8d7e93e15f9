"""The data plane on GPUs: NCCL through cupy, all-to-all as grouped point-to-point calls.

The router creates the NCCL unique id and hands it to the expert actors through Ray. Every call is
enqueued on the current torch CUDA stream, so it orders with the surrounding torch kernels. NCCL
itself never times out: a watchdog thread follows each enqueued collective's CUDA event and aborts
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
from router.transport import HEADER_LEN, ROUTER_RANK


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


class _Pending:
    def __init__(self, event: torch.cuda.Event, out: torch.Tensor, watchdog: Watchdog) -> None:
        self._event, self._out, self._watchdog = event, out, watchdog

    def wait(self) -> torch.Tensor:
        self._watchdog.check()
        torch.cuda.current_stream().wait_event(self._event)
        return self._out


class NcclTransport:
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

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def _followed(self, what: str) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record()
        self.watchdog.follow(event, what)
        return event

    def broadcast_header(self, header: torch.Tensor | None) -> torch.Tensor:
        self.watchdog.check()
        buf = (header if header is not None else torch.zeros(HEADER_LEN, dtype=torch.int64)).to(self.device)
        ptr = buf.data_ptr()
        try:
            self.comm.broadcast(ptr, ptr, HEADER_LEN, self._nccl.NCCL_INT64, ROUTER_RANK, self._stream())
            self._followed("header broadcast")
            return buf.cpu()
        except (RuntimeError, self._nccl.NcclError) as err:
            self.watchdog.check()
            raise TransportError(f"NCCL header broadcast failed: {err}") from err

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> _Pending:
        self.watchdog.check()
        send = send.contiguous()
        out = send.new_empty(sum(recv_splits), *send.shape[1:])
        row = send[0].numel() if send.shape[0] else out[0].numel() if out.shape[0] else 0
        dtype, stream, size = _nccl_dtype(send.dtype), self._stream(), send.element_size()
        send_off = recv_off = 0
        self._nccl.groupStart()
        for peer in range(self.world_size):
            if send_splits[peer]:
                ptr = send.data_ptr() + send_off * row * size
                self.comm.send(ptr, send_splits[peer] * row, dtype, peer, stream)
            if recv_splits[peer]:
                ptr = out.data_ptr() + recv_off * row * size
                self.comm.recv(ptr, recv_splits[peer] * row, dtype, peer, stream)
            send_off += send_splits[peer]
            recv_off += recv_splits[peer]
        self._nccl.groupEnd()
        return _Pending(self._followed("all_to_all"), out, self.watchdog)

    def close(self) -> None:
        self.watchdog.close()
        if self.watchdog.failure is None:
            self.comm.destroy()
