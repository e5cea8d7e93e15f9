"""The data plane between a router and its expert ranks, and how a group of them is formed.

The router picks a rendezvous (`new_rendezvous`) and hands it to every expert actor through Ray; each
rank then joins with `open_transport`, which returns once the whole group has joined.
"""

from __future__ import annotations

import socket
from typing import Literal

import ray

from router.transport import Transport

TransportKind = Literal["gloo", "nccl"]


def new_rendezvous(kind: TransportKind) -> str | tuple:
    if kind == "nccl":
        from cluster.transport.nccl import new_unique_id

        return new_unique_id()
    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def open_transport(
    kind: TransportKind, rendezvous: str | tuple, rank: int, world_size: int, timeout_s: float
) -> Transport:
    if kind == "nccl":
        from cluster.transport.nccl import NcclTransport

        return NcclTransport(rendezvous, rank, world_size, timeout_s)
    from cluster.transport.gloo import GlooTransport

    return GlooTransport(rendezvous, rank, world_size, timeout_s)
