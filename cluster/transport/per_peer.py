"""A transport that reaches each peer through its own transport (shared memory on the same node, gloo
beyond), so one rank can talk to both kinds of peer through one Transport."""

from __future__ import annotations

import torch

from router.errors import TransportError
from router.transport import Transport


class PerPeerTransport:
    def __init__(self, rank: int, world_size: int, routes: dict[int, tuple[Transport, int]]) -> None:
        """`routes` maps a peer's rank to (the transport that reaches it, the peer's rank in it)."""
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cpu")
        self._routes = routes
        self._transports = list({id(t): t for t, _ in routes.values()}.values())

    def route(self, peer: int) -> tuple[Transport, int]:
        route = self._routes.get(peer)
        if route is None:
            raise TransportError(f"rank {self.rank} has no transport to rank {peer}")
        return route

    def send(self, dst: int, head: list[int], payload: torch.Tensor | None = None) -> None:
        transport, local = self.route(dst)
        transport.send(local, head, payload)

    def recv(self, src: int, width: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
        transport, local = self.route(src)
        return transport.recv(local, width, dtype)

    def close(self) -> None:
        for transport in self._transports:
            transport.close()


def carrier(transport: Transport, peer: int) -> Transport:
    """The transport that carries messages between this rank and `peer`."""
    return transport.route(peer)[0] if isinstance(transport, PerPeerTransport) else transport
