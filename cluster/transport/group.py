"""Forming the data plane between a router and its expert ranks: the rendezvous and the transports.

The router picks a rendezvous (`new_rendezvous`) from where its ranks run and hands it to every
expert actor through Ray; each rank then joins with `open_transport`, which returns once the ranks it
talks to have joined. On CPUs the transport is chosen per pair of ranks: shared memory between the
router and the expert ranks on its Ray node, gloo to those on other nodes. On GPUs NCCL carries every
pair (it picks NVLink, PCIe or the network itself).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Literal

from router.transport import ROUTER_RANK, Transport

TransportKind = Literal["auto", "shm", "gloo", "nccl"]


@dataclass(frozen=True)
class Rendezvous:
    kind: TransportKind
    nccl_id: tuple[int, ...] | None = None
    shm_prefix: str | None = None
    shm_ranks: tuple[int, ...] = ()  # the router and the expert ranks on its node
    dedicated_cores: bool = False  # each of shm_ranks has a core of its own: its waits spin longer
    gloo_address: str | None = None
    gloo_ranks: tuple[int, ...] = ()  # the router and the expert ranks it reaches over gloo, in group order


def new_rendezvous(kind: TransportKind, nodes: list[str], dedicated_cores: bool = False) -> Rendezvous:
    """`nodes[r]` is the Ray node id of rank r (the router first); `dedicated_cores`: each rank on the
    router's node has a core of its own (cluster/instance/resources.py: cores_are_dedicated)."""
    if kind == "nccl":
        from cluster.transport.nccl import new_unique_id

        return Rendezvous(kind, nccl_id=new_unique_id())
    local = tuple(r for r, node in enumerate(nodes) if node == nodes[ROUTER_RANK]) if kind != "gloo" else ()
    remote = tuple(r for r in range(len(nodes)) if r not in local)
    if kind == "shm" and remote:
        raise ValueError(f"transport=shm, but expert ranks {list(remote)} are on other nodes than the router")
    shm = None
    if len(local) > 1:
        from cluster.transport.shm import new_prefix

        shm = new_prefix()
    gloo_ranks = (ROUTER_RANK, *(r for r in remote if r != ROUTER_RANK)) if remote else ()
    return Rendezvous(
        kind,
        shm_prefix=shm,
        shm_ranks=local,
        dedicated_cores=dedicated_cores,
        gloo_address=_gloo_address() if gloo_ranks else None,
        gloo_ranks=gloo_ranks,
    )


def _gloo_address() -> str:
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as sock:
        sock.bind((host, 0))
        return f"{host}:{sock.getsockname()[1]}"


def open_transport(rendezvous: Rendezvous, rank: int, world_size: int, timeout_s: float) -> Transport:
    if rendezvous.kind == "nccl":
        from cluster.transport.nccl import NcclTransport

        return NcclTransport(rendezvous.nccl_id, rank, world_size, timeout_s)
    routes: dict[int, tuple[Transport, int]] = {}
    if rendezvous.shm_prefix is not None and rank in rendezvous.shm_ranks:
        from cluster.transport.shm import DEDICATED_SPIN_S, SPIN_S, ShmTransport

        peers = [r for r in rendezvous.shm_ranks if r != rank] if rank == ROUTER_RANK else [ROUTER_RANK]
        spin_s = DEDICATED_SPIN_S if rendezvous.dedicated_cores else SPIN_S
        shm = ShmTransport(rendezvous.shm_prefix, rank, world_size, peers, timeout_s, spin_s=spin_s)
        routes.update({peer: (shm, peer) for peer in peers})
    if rank in rendezvous.gloo_ranks:
        from cluster.transport.gloo import GlooTransport

        ranks = rendezvous.gloo_ranks
        gloo = GlooTransport(rendezvous.gloo_address, ranks.index(rank), len(ranks), timeout_s)
        peers = [r for r in ranks if r != rank] if rank == ROUTER_RANK else [ROUTER_RANK]
        routes.update({peer: (gloo, ranks.index(peer)) for peer in peers})
    only = {id(t): t for t, _ in routes.values()}
    if len(only) == 1 and (t := next(iter(only.values()))).rank == rank and t.world_size == world_size:
        return t  # one transport, in which every peer has its own rank
    from cluster.transport.per_peer import PerPeerTransport

    return PerPeerTransport(rank, world_size, routes)
