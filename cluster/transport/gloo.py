"""The data plane between hosts: torch.distributed's gloo backend, point-to-point over TCP.

One process group per engine generation. A message is two gloo sends on separate tags (the head, then
the payload when it has rows); gloo keeps each (peer, tag) stream in order, so heads and payloads pair up.
The recv of a peer's next head is posted as soon as its last one arrived: gloo holds back a send until
the receiver has posted its recv, and a late recv cost ~4 ms per message on loopback (measured with
benchmarks/transport.py), an early one ~0.1 ms.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from router.errors import TransportError
from router.transport import HEAD_LEN, ROUTER_RANK, ROWS

HEAD_TAG, PAYLOAD_TAG = 0, 1


def _recv_failed(src: int, err: RuntimeError) -> TransportError:
    return TransportError(f"gloo recv from rank {src} failed: {err}")


class GlooTransport:
    """Joins a gloo group at `address` (the router's host:port, handed out through Ray)."""

    def __init__(self, address: str, rank: int, world_size: int, timeout_s: float = 60.0) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self._timeout = datetime.timedelta(seconds=timeout_s)
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(
            host, int(port), world_size, is_master=rank == ROUTER_RANK, timeout=self._timeout
        )
        self.group = dist.ProcessGroupGloo(store, rank, world_size, self._timeout)
        self._sending: list[tuple[dist.Work, torch.Tensor, int]] = []  # kept alive until gloo has sent them
        self._posted: dict[int, tuple[dist.Work, torch.Tensor]] = {}

    def _post_head(self, src: int) -> tuple[dist.Work, torch.Tensor]:
        head_tensor = torch.empty(HEAD_LEN, dtype=torch.int64)
        return self._post(head_tensor, src, HEAD_TAG), head_tensor

    def _post(self, tensor: torch.Tensor, src: int, tag: int) -> dist.Work:
        """A recv posted; gloo raises right here when the connection to `src` already broke."""
        try:
            return self.group.recv([tensor], src, tag)
        except RuntimeError as err:
            raise _recv_failed(src, err) from err

    def send(self, dst: int, head: list[int], payload: torch.Tensor | None = None) -> None:
        self._reap(dst)
        head_tensor = torch.tensor(head, dtype=torch.int64)
        try:
            self._sending.append((self.group.send([head_tensor], dst, HEAD_TAG), head_tensor, dst))
            if head[ROWS] > 0:
                assert payload is not None and payload.shape[0] == head[ROWS]
                rows = payload.contiguous()
                self._sending.append((self.group.send([rows], dst, PAYLOAD_TAG), rows, dst))
        except RuntimeError as err:
            raise TransportError(f"gloo send to rank {dst} failed: {err}") from err

    def recv(self, src: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        work, head_tensor = self._posted.pop(src, None) or self._post_head(src)
        self._wait(work, src)
        head = head_tensor.tolist()
        self._posted[src] = self._post_head(src)
        payload = torch.empty(head[ROWS], width, dtype=dtype)
        if head[ROWS] > 0:
            self._wait(self._post(payload, src, PAYLOAD_TAG), src)
        return head, payload

    def _wait(self, work: dist.Work, src: int) -> None:
        try:
            if not work.wait(self._timeout):
                raise TransportError(f"gloo recv from rank {src} timed out")
        except RuntimeError as err:
            raise _recv_failed(src, err) from err

    def _reap(self, dst: int) -> None:
        """Drops the sends that completed, raising if one to `dst` failed. A failed send to another
        peer is dropped too: the recv of that peer's answer fails on the same broken connection, and
        after a failover to a group without that peer, the sends to the live ones must go on."""
        pending, failed = [], None
        for work, tensor, peer in self._sending:
            if not work.is_completed():
                pending.append((work, tensor, peer))
            elif not work.is_success() and peer == dst and failed is None:
                failed = TransportError(f"gloo send to rank {dst} failed: {work.exception()}")
        self._sending = pending
        if failed is not None:
            raise failed

    def close(self) -> None:
        self._sending = []
        self.group = None
