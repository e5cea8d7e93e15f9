"""The data plane on CPUs: torch.distributed's gloo backend, one process group per engine generation."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from router.errors import TransportError
from router.transport import HEADER_LEN, ROUTER_RANK


class _Pending:
    def __init__(self, work: dist.Work, out: torch.Tensor) -> None:
        self._work, self._out = work, out

    def wait(self) -> torch.Tensor:
        try:
            self._work.wait()
        except RuntimeError as err:
            raise TransportError(f"gloo all_to_all failed: {err}") from err
        return self._out


class GlooTransport:
    """Joins a gloo group at `address` (the router's host:port, handed out through Ray)."""

    def __init__(self, address: str, rank: int, world_size: int, timeout_s: float = 60.0) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(
            host,
            int(port),
            world_size,
            is_master=rank == ROUTER_RANK,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.group = dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))

    def broadcast_header(self, header: torch.Tensor | None) -> torch.Tensor:
        buf = header if header is not None else torch.zeros(HEADER_LEN, dtype=torch.int64)
        opts = dist.BroadcastOptions()
        opts.rootRank = ROUTER_RANK
        try:
            self.group.broadcast([buf], opts).wait()
        except RuntimeError as err:
            raise TransportError(f"gloo header broadcast failed: {err}") from err
        return buf

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> _Pending:
        out = send.new_empty(sum(recv_splits), *send.shape[1:])
        work = self.group.alltoall_base(
            out, send.contiguous(), recv_splits, send_splits, dist.AllToAllOptions()
        )
        return _Pending(work, out)

    def close(self) -> None:
        self.group = None
