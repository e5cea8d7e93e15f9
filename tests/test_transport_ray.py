"""The transport as the engine forms it: Ray actors report their node, the router picks shm or gloo per
pair from that, and a killed actor is a TransportError in the router within the timeout."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from cluster.engine import Engine
from cluster.transport.group import new_rendezvous, open_transport
from cluster.transport.shm import ShmTransport
from router.errors import TransportError
from router.transport import LAYER, OP, ROUTER_RANK, ROWS, TAG, Op, head


@ray.remote(num_cpus=0.5)
class EchoRank:
    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def serve(self, rendezvous, rank: int, world: int, timeout_s: float) -> str:
        """Answers DISPATCH with COMBINE (payload * rank) until STOP; returns the transport's type."""
        t = open_transport(rendezvous, rank, world, timeout_s)
        try:
            while True:
                got, rows = t.recv(ROUTER_RANK, 8, torch.float32)
                if got[OP] == Op.STOP:
                    return type(t).__name__
                t.send(ROUTER_RANK, head(Op.COMBINE, got[LAYER], got[ROWS], got[TAG]), rows * rank)
        finally:
            t.close()


def _group(kind: str, ranks: list, timeout_s: float = 30.0):
    infos = ray.get([r.info.remote() for r in ranks])
    nodes = [ray.get_runtime_context().get_node_id()] + [i["node_id"] for i in infos]
    rendezvous = new_rendezvous(kind, nodes)
    world = len(ranks) + 1
    serving = [r.serve.remote(rendezvous, i + 1, world, timeout_s) for i, r in enumerate(ranks)]
    return open_transport(rendezvous, ROUTER_RANK, world, timeout_s), serving, infos


@pytest.mark.parametrize("kind", ["auto", "gloo"])
def test_actors_on_the_routers_node_exchange_over_shm_or_gloo_as_chosen(ray_cluster, kind):
    ranks = [EchoRank.remote() for _ in range(2)]
    router, serving, _ = _group(kind, ranks)
    rows = torch.arange(40, dtype=torch.float32).view(5, 8)
    for layer in range(3):
        for rank in (1, 2):
            router.send(rank, head(Op.DISPATCH, layer, 5 - layer, layer % 2), rows[: 5 - layer])
        for rank in (2, 1):
            got, answer = router.recv(rank, 8, torch.float32)
            assert got == head(Op.COMBINE, layer, 5 - layer, layer % 2)
            assert torch.equal(answer, rows[: 5 - layer] * rank)
    for rank in (1, 2):
        router.send(rank, head(Op.STOP))
    expected = "ShmTransport" if kind == "auto" else "GlooTransport"
    assert ray.get(serving, timeout=30) == [expected, expected]
    assert isinstance(router, ShmTransport) == (kind == "auto")
    router.close()
    for r in ranks:
        ray.kill(r)


def test_an_actor_killed_while_the_router_waits_on_shm_is_a_transport_error_at_once(ray_cluster):
    ranks = [EchoRank.remote()]
    router, serving, infos = _group("auto", ranks, timeout_s=30)
    router.send(1, head(Op.DISPATCH, 0, 1, 0), torch.ones(1, 8))
    router.recv(1, 8, torch.float32)
    os.kill(infos[0]["pid"], signal.SIGKILL)  # the actor is now inside its own recv wait
    start = time.monotonic()
    with pytest.raises(TransportError, match="died"):
        router.recv(1, 8, torch.float32)
    assert time.monotonic() - start < 2.0
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(serving, timeout=30)
    router.close()


@pytest.mark.parametrize(("transport", "splits"), [("auto", True), ("gloo", False)])
def test_unset_overlap_splits_steps_only_over_shared_memory(ray_cluster, demo_model, transport, splits):
    """Two-batch overlap measured faster over shared memory and slower over gloo, so unset it follows them."""
    options = {"expert_shards": 1, "router_cpus": 0.5, "expert_cpus": 0.5, "transport": transport}
    with Engine(demo_model, max_model_len=128, **options) as engine:
        engine.generate([[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], max_new_tokens=4, ignore_eos=True)
        stats = engine.stats()
    assert stats["steps"] > 0
    assert (stats["split_steps"] > 0) == splits
