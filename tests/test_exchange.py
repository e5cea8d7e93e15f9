"""Dispatch plan, expert-side compute and the dispatch/combine exchange, all in one process.

The transport tests run the real gloo transport: the router (rank 0) in the test's thread and every
expert rank's loop (router/expert_loop.py) in a thread of its own, each with its own process group on
loopback.
"""

from __future__ import annotations

import socket
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

from cluster.transport.gloo import GlooTransport
from experts.balancer import rebalance
from experts.placement import ExpertPlacement, ModelPlacement
from experts.shard import ExpertShard
from router.errors import TransportError
from router.exchange import (
    LocalExperts,
    TransportExperts,
    pack_rows,
    plan_dispatch,
    row_width,
    unpack_rows,
)
from router.expert_loop import run_expert_loop

HIDDEN = 16
INTER = 8
NUM_LAYERS = 2

PLACEMENTS = [
    (10, 3, "contiguous"),
    (10, 3, "round_robin"),
    (8, 4, "contiguous"),
    (6, 1, "contiguous"),
    (5, 5, "round_robin"),
]


pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _routing(
    num_tokens: int, k: int, allowed: list[int], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing: k distinct experts per token drawn from `allowed`, random fp32 weights."""
    assert len(allowed) >= k
    allowed_t = torch.tensor(allowed)
    pick = torch.rand(num_tokens, len(allowed), generator=gen).topk(k, dim=1).indices
    ids = allowed_t[pick]
    weights = torch.rand(num_tokens, k, generator=gen) + 0.1
    return ids, weights


def _experts(num_experts: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer: gate_up [E, 2I, H] and down [E, H, I] for every global expert."""
    gate_up = [torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) * 0.3 for _ in range(NUM_LAYERS)]
    down = [torch.randn(num_experts, HIDDEN, INTER, generator=gen) * 0.3 for _ in range(NUM_LAYERS)]
    return gate_up, down


def _on_every_layer(placement: ExpertPlacement) -> ModelPlacement:
    return ModelPlacement([placement] * NUM_LAYERS)


def _shards(
    placement: ModelPlacement, gate_up: list[torch.Tensor], down: list[torch.Tensor], dtype: torch.dtype
) -> list[ExpertShard]:
    shards = []
    for shard in range(placement.num_shards):
        owned = [torch.tensor(ids) for ids in placement.slots_of(shard)]
        shards.append(
            ExpertShard(
                [g[ids].to(dtype) for g, ids in zip(gate_up, owned, strict=True)],
                [d[ids].to(dtype) for d, ids in zip(down, owned, strict=True)],
            )
        )
    return shards


def _shared(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * 0.5 + 0.25


def _dense_reference(
    layer: int,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: list[torch.Tensor],
    down: list[torch.Tensor],
) -> torch.Tensor:
    """shared(x) + sum over each token's top-k of w * down(silu(gate(x)) * up(x)), in float64."""
    x = hidden.double()
    gate, up = torch.einsum("tkoh,th->tko", gate_up[layer][ids].double(), x).chunk(2, dim=-1)
    routed = torch.einsum("tkhi,tki->tkh", down[layer][ids].double(), F.silu(gate) * up)
    return _shared(hidden).double() + (weights.double()[:, :, None] * routed).sum(1)


def _distinct_shards(ids: torch.Tensor, placement: ExpertPlacement) -> list[int]:
    return [len({int(placement.shard_of[e]) for e in row}) for row in ids]


# ---------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize(("num_experts", "num_shards", "strategy"), PLACEMENTS)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_plan_dispatch_sends_each_token_once_per_destination_shard(
    num_experts: int, num_shards: int, strategy: str, k: int
) -> None:
    if k > num_experts:
        pytest.skip("top-k larger than the expert count")
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    gen = torch.Generator().manual_seed(1000 * k + num_experts + num_shards)
    ids, weights = _routing(23, k, list(range(num_experts)), gen)

    plan = plan_dispatch(ids, weights, placement)

    rows = plan.token_index.numel()
    assert plan.local_ids.shape == (rows, k) and plan.local_ids.dtype == torch.int64
    assert plan.weights.shape == (rows, k) and plan.weights.dtype == torch.float32
    assert len(plan.shard_counts) == num_shards
    assert sum(plan.shard_counts) == rows
    row_shard = torch.repeat_interleave(torch.arange(num_shards), torch.tensor(plan.shard_counts))

    expected = {}
    for t in range(ids.shape[0]):
        for s in {int(placement.shard_of[e]) for e in ids[t]}:
            expected[(t, s)] = (
                [int(placement.local_index[e]) if int(placement.shard_of[e]) == s else -1 for e in ids[t]],
                [
                    float(w) if int(placement.shard_of[e]) == s else 0.0
                    for e, w in zip(ids[t], weights[t], strict=True)
                ],
            )
    got = {}
    for r in range(rows):
        key = (int(plan.token_index[r]), int(row_shard[r]))
        assert key not in got, f"token {key[0]} sent twice to shard {key[1]}"
        got[key] = (plan.local_ids[r].tolist(), plan.weights[r].tolist())
    assert got == expected
    assert rows == sum(_distinct_shards(ids, placement))
    for r in range(rows):  # every valid slot names a local expert the destination shard owns
        for slot in plan.local_ids[r].tolist():
            assert -1 <= slot < placement.num_local(int(row_shard[r]))


@pytest.mark.parametrize(("num_experts", "num_shards", "redundant"), [(10, 3, 4), (8, 2, 8), (6, 4, 18)])
def test_plan_dispatch_spreads_an_expert_over_its_replicas(num_experts, num_shards, redundant) -> None:
    k = 2
    placement = ExpertPlacement(num_experts, num_shards, redundant=redundant)
    gen = torch.Generator().manual_seed(num_experts + redundant)
    ids, weights = _routing(41, k, list(range(num_experts)), gen)

    plan = plan_dispatch(ids, weights, placement)

    row_shard = torch.repeat_interleave(torch.arange(num_shards), torch.tensor(plan.shard_counts))
    seen, served = set(), {}
    for r in range(plan.token_index.numel()):
        token, shard = int(plan.token_index[r]), int(row_shard[r])
        assert (token, shard) not in seen, f"token {token} sent twice to shard {shard}"
        seen.add((token, shard))
        for slot, weight in zip(plan.local_ids[r].tolist(), plan.weights[r].tolist(), strict=True):
            if slot >= 0:
                expert = placement.experts_of(shard)[slot]
                position = ids[token].tolist().index(expert)
                assert weight == pytest.approx(float(weights[token, position]))
                served.setdefault(expert, []).append((shard, slot))
    for expert in range(num_experts):  # every (token, expert) pair served once, evenly over replicas
        got = served.get(expert, [])
        assert len(got) == int((ids == expert).sum())
        per_replica = [got.count(replica) for replica in placement.replicas_of(expert)]
        assert sum(per_replica) == len(got) and max(per_replica) - min(per_replica) <= 1
    again = plan_dispatch(ids, weights, placement)
    assert torch.equal(again.token_index, plan.token_index) and torch.equal(again.local_ids, plan.local_ids)


def test_plan_dispatch_rows_are_grouped_by_shard_when_tokens_alternate() -> None:
    placement = ExpertPlacement(4, 2)  # experts 0, 1 on shard 0; 2, 3 on shard 1
    ids = torch.tensor([[2], [0], [3], [1], [2]])
    plan = plan_dispatch(ids, torch.ones(5, 1), placement)
    assert plan.shard_counts == [2, 3]
    assert sorted(plan.token_index[:2].tolist()) == [1, 3]
    assert sorted(plan.token_index[2:].tolist()) == [0, 2, 4]


def test_plan_dispatch_with_an_idle_shard() -> None:
    placement = ExpertPlacement(9, 3)
    gen = torch.Generator().manual_seed(7)
    ids, weights = _routing(11, 2, placement.experts_of(0) + placement.experts_of(2), gen)
    plan = plan_dispatch(ids, weights, placement)
    assert plan.shard_counts[1] == 0
    assert sum(plan.shard_counts) == plan.token_index.numel() == sum(_distinct_shards(ids, placement))


# ---------------------------------------------------------------------------------------------- wire


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_pack_unpack_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    k = 4
    hidden = torch.randn(9, HIDDEN, generator=gen).to(dtype)
    local_ids = torch.randint(-1, 256, (9, k), generator=gen)
    local_ids[0] = -1
    # fp32 weights that bf16 / fp16 cannot represent, plus extreme values
    weights = torch.rand(9, k, generator=gen) * 2.7 + 1e-7
    weights[1] = torch.tensor([0.0, 1e-30, 3.0e38, 0.1234567])

    rows = pack_rows(hidden, local_ids, weights)

    assert rows.dtype == dtype
    assert rows.shape == (9, row_width(HIDDEN, k, dtype))
    out_hidden, out_ids, out_weights = unpack_rows(rows, HIDDEN, k)
    bits = torch.int16 if dtype.itemsize == 2 else torch.int32
    assert torch.equal(out_hidden.contiguous().view(bits), hidden.view(bits))
    assert out_ids.dtype == torch.int64 and torch.equal(out_ids, local_ids)
    assert out_weights.dtype == torch.float32
    assert torch.equal(out_weights.view(torch.int32), weights.view(torch.int32))


def test_pack_unpack_of_no_rows() -> None:
    rows = pack_rows(
        torch.empty(0, HIDDEN, dtype=torch.bfloat16), torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3)
    )
    assert rows.shape == (0, row_width(HIDDEN, 3, torch.bfloat16))
    hidden, ids, weights = unpack_rows(rows, HIDDEN, 3)
    assert hidden.shape == (0, HIDDEN) and ids.shape == (0, 3) and weights.shape == (0, 3)


# ---------------------------------------------------------------------------------------------- local


def _edge_routings(placement: ExpertPlacement, k: int, gen: torch.Generator):
    """(name, ids, weights): random; one shard receiving nothing; an expert receiving nothing."""
    everyone = list(range(placement.num_experts))
    yield "random", *_routing(13, k, everyone, gen)
    if placement.num_shards > 1:
        idle = placement.num_shards - 1
        allowed = [e for e in everyone if int(placement.shard_of[e]) != idle]
        yield "idle shard", *_routing(9, k, allowed, gen)
    unused = placement.experts_of(0)[0]
    yield "unused expert", *_routing(9, k, [e for e in everyone if e != unused], gen)
    yield "single token", *_routing(1, k, everyone, gen)


@pytest.mark.parametrize(
    ("num_shards", "strategy", "redundant"),
    [(s, p, 0) for s in (1, 2, 3, 4) for p in ("contiguous", "round_robin")]
    + [(3, "contiguous", 7), (2, "round_robin", 10)],
)
def test_local_experts_equal_dense_reference(num_shards: int, strategy: str, redundant: int) -> None:
    num_experts, k = 10, 3
    gen = torch.Generator().manual_seed(num_shards)
    placement = ExpertPlacement(num_experts, num_shards, strategy, redundant)
    gate_up, down = _experts(num_experts, gen)
    layered = _on_every_layer(placement)
    local = LocalExperts(_shards(layered, gate_up, down, torch.float32), layered)
    for name, ids, weights in _edge_routings(placement, k, gen):
        for layer in range(NUM_LAYERS):
            hidden = torch.randn(ids.shape[0], HIDDEN, generator=gen)
            out = local.combine(local.dispatch(layer, hidden, ids, weights), _shared(hidden))
            ref = _dense_reference(layer, hidden, ids, weights, gate_up, down)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=f"{name}, layer {layer}")


def _per_layer_placement(num_experts: int, num_shards: int, redundant: int) -> ModelPlacement:
    """Layer 0 static, layer 1 balanced for a load of its own (other slots, other replica counts)."""
    static = ExpertPlacement(num_experts, num_shards, redundant=redundant)
    hot = torch.ones(num_experts, dtype=torch.long)
    hot[[0, 1]] = 100  # both on shard 0 in the static placement
    layers = [static, rebalance(hot, static)]
    assert layers[1] != static and len(layers[1].replicas_of(0)) > 1, "precondition: layer 1 differs"
    return ModelPlacement(layers)


def test_each_layer_dispatches_by_its_own_placement() -> None:
    """Over gloo and in process, layer by layer, equal to the dense reference: each layer's slots hold
    that layer's experts, and the plan of each layer follows that layer's placement."""
    num_experts, k = 10, 3
    gen = torch.Generator().manual_seed(21)
    placement = _per_layer_placement(num_experts, 3, 5)
    gate_up, down = _experts(num_experts, gen)
    shards = _shards(placement, gate_up, down, torch.float32)
    local = LocalExperts(shards, placement)
    group = ExpertGroup(shards, k, torch.float32)
    with group:
        remote = TransportExperts(group.router, placement, k)
        for _ in range(3):
            for layer in range(NUM_LAYERS):
                ids, weights = _routing(7, k, list(range(num_experts)), gen)
                hidden = torch.randn(7, HIDDEN, generator=gen)
                ref = _dense_reference(layer, hidden, ids, weights, gate_up, down)
                for experts in (local, remote):
                    out = experts.combine(experts.dispatch(layer, hidden, ids, weights), _shared(hidden))
                    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        remote.stop()
    assert not group.errors, group.errors


def test_idle_shard_routing_really_leaves_a_shard_without_rows() -> None:
    placement = ExpertPlacement(10, 3)
    gen = torch.Generator().manual_seed(0)
    routings = {name: (ids, w) for name, ids, w in _edge_routings(placement, 3, gen)}
    ids, weights = routings["idle shard"]
    assert plan_dispatch(ids, weights, placement).shard_counts[2] == 0
    ids, _ = routings["unused expert"]
    assert not (ids == placement.experts_of(0)[0]).any()


# ---------------------------------------------------------------------------------------------- transport


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step_routings(placement: ExpertPlacement, k: int, gen: torch.Generator):
    """The routings of a few steps, one list of per-layer (ids, weights) per step."""
    everyone = list(range(placement.num_experts))
    steps = [[_routing(7, k, everyone, gen) for _ in range(NUM_LAYERS)]]
    if placement.num_shards > 1:
        not_first = [e for e in everyone if int(placement.shard_of[e]) != 0]
        not_last = [e for e in everyone if int(placement.shard_of[e]) != placement.num_shards - 1]
        # the last shard receives no token in a whole step; shard 0 none in one layer of the next
        steps.append([_routing(5, k, not_last, gen) for _ in range(NUM_LAYERS)])
        steps.append([_routing(6, k, not_first, gen), _routing(6, k, everyone, gen)])
    unused = placement.experts_of(0)[-1]
    steps.append([_routing(4, k, [e for e in everyone if e != unused], gen) for _ in range(NUM_LAYERS)])
    steps.append([_routing(1, k, everyone, gen) for _ in range(NUM_LAYERS)])  # a one-token decode step
    return steps


class ExpertGroup:
    """A router transport in this thread and one expert loop thread per shard, over gloo on loopback."""

    def __init__(self, shards: list[ExpertShard], k: int, dtype: torch.dtype, timeout_s: float = 15) -> None:
        address = f"127.0.0.1:{_free_port()}"
        self.world = len(shards) + 1
        self.served: dict[int, int] = {}
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(
                target=self._rank, args=(address, r, shards[r - 1], k, dtype, timeout_s), daemon=True
            )
            for r in range(1, self.world)
        ]
        for thread in self.threads:
            thread.start()
        self.router = GlooTransport(address, 0, self.world, timeout_s=timeout_s)

    def _rank(self, address, rank, shard, k, dtype, timeout_s) -> None:
        try:
            transport = GlooTransport(address, rank, self.world, timeout_s=timeout_s)
            try:
                self.served[rank] = run_expert_loop(transport, shard, k, dtype)
            finally:
                transport.close()
        except BaseException as err:
            self.errors.append(err)

    def __enter__(self) -> ExpertGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()

    def join(self) -> None:
        """After STOP (or, if the test failed first, the ranks' timeout): the router closes last, as
        its sends are asynchronous and the ranks must have received them."""
        for thread in self.threads:
            thread.join(timeout=60)
        self.router.close()
        assert not any(t.is_alive() for t in self.threads)


def _fp32_group(
    num_experts: int, num_shards: int, k: int, seed: int, timeout_s: float = 15, strategy: str = "contiguous"
) -> tuple[ExpertPlacement, torch.Generator, list[ExpertShard], ExpertGroup]:
    gen = torch.Generator().manual_seed(seed)
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    gate_up, down = _experts(num_experts, gen)
    shards = _shards(_on_every_layer(placement), gate_up, down, torch.float32)
    return placement, gen, shards, ExpertGroup(shards, k, torch.float32, timeout_s)


@pytest.mark.parametrize(
    ("num_experts", "num_shards", "strategy", "dtype"),
    [
        (6, 1, "contiguous", torch.float32),
        (8, 2, "round_robin", torch.float32),
        (10, 3, "contiguous", torch.float32),
        (10, 3, "round_robin", torch.bfloat16),
        (8, 4, "contiguous", torch.float32),
    ],
)
def test_transport_experts_over_gloo_equal_local_experts(
    num_experts: int, num_shards: int, strategy: str, dtype: torch.dtype
) -> None:
    k = 3
    gen = torch.Generator().manual_seed(num_experts * 10 + num_shards)
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    gate_up, down = _experts(num_experts, gen)
    shards = _shards(_on_every_layer(placement), gate_up, down, dtype)
    local = LocalExperts(shards, _on_every_layer(placement))
    steps = _step_routings(placement, k, gen)
    inputs = [[torch.randn(ids.shape[0], HIDDEN, generator=gen).to(dtype) for ids, _ in s] for s in steps]
    expected_messages = {r: 0 for r in range(1, num_shards + 1)}

    group = ExpertGroup(shards, k, dtype)
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), k)
        for step, step_inputs in zip(steps, inputs, strict=True):
            for layer, ((ids, weights), hidden) in enumerate(zip(step, step_inputs, strict=True)):
                before = remote.stats.payload_bytes, remote.stats.meta_bytes
                got = remote.combine(remote.dispatch(layer, hidden, ids, weights), _shared(hidden))
                rows = sum(_distinct_shards(ids, placement))
                # bytes per MoE layer: each token once per distinct destination shard
                assert remote.stats.payload_bytes - before[0] == rows * HIDDEN * dtype.itemsize
                assert remote.stats.meta_bytes - before[1] == rows * 2 * k * 4
                want = local.combine(local.dispatch(layer, hidden, ids, weights), _shared(hidden))
                assert got.dtype == dtype
                tol = {"atol": 1e-6, "rtol": 0} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
                torch.testing.assert_close(got, want, **tol, msg=f"layer {layer}")
                for shard in {int(placement.shard_of[e]) for e in ids.flatten()}:
                    expected_messages[shard + 1] += 1
            remote.heartbeat()  # between steps, as the idle engine loop does: not a dispatch
        remote.stop()
    assert not group.errors, group.errors
    # a rank hears only of the (layer) dispatches that have rows for it: idle ranks got no message
    assert group.served == expected_messages
    assert remote.stats.messages == sum(expected_messages.values())

    pairs = [(ids, layer) for step in steps for layer, (ids, _) in enumerate(step)]
    rows = sum(sum(_distinct_shards(ids, placement)) for ids, _ in pairs)
    assert remote.stats.rows_sent == rows
    assert remote.stats.payload_bytes == rows * HIDDEN * dtype.itemsize
    assert remote.stats.meta_bytes == rows * 2 * k * 4
    assert remote.stats.wait_seconds > 0


def test_two_micro_batches_interleave_on_the_expert_ranks() -> None:
    """Dispatch A, dispatch B, then combine A, combine B, layer after layer: each answer is its own
    micro-batch's, with A's and B's rows in flight on every rank at once."""
    num_experts, k = 8, 2
    placement, gen, shards, group = _fp32_group(num_experts, 2, k, seed=5, strategy="round_robin")
    local = LocalExperts(shards, _on_every_layer(placement))
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), k)
        for layer in range(NUM_LAYERS):
            batches = [
                (*_routing(n, k, list(range(num_experts)), gen), torch.randn(n, HIDDEN, generator=gen))
                for n in (5, 3)
            ]
            sent = [remote.dispatch(layer, h, ids, w, tag) for tag, (ids, w, h) in enumerate(batches)]
            for (ids, w, h), handle in zip(batches, sent, strict=True):
                want = local.combine(local.dispatch(layer, h, ids, w), _shared(h))
                torch.testing.assert_close(remote.combine(handle, _shared(h)), want, atol=1e-6, rtol=0)
        a = remote.dispatch(0, *_swap(batches[0]), 0)
        b = remote.dispatch(0, *_swap(batches[1]), 1)
        with pytest.raises(RuntimeError, match="out of dispatch order"):
            remote.combine(b, torch.zeros(3, HIDDEN))
        remote.combine(a, torch.zeros(5, HIDDEN))
        remote.combine(b, torch.zeros(3, HIDDEN))
        remote.stop()
    assert not group.errors, group.errors


def _swap(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    ids, weights, hidden = batch
    return hidden, ids, weights


def test_a_rank_that_owns_no_routed_expert_gets_no_message_and_the_router_does_not_wait() -> None:
    """Every token routed to shard 0 for many layers: shard 1 hears nothing but STOP; a router that
    waited for it would time out (the group's timeout is short)."""
    k = 2
    placement, gen, _, group = _fp32_group(6, 2, k, seed=9, timeout_s=3)
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), k)
        for layer in range(NUM_LAYERS):
            ids, weights = _routing(4, k, placement.experts_of(0), gen)
            hidden = torch.randn(4, HIDDEN, generator=gen)
            sent = remote.dispatch(layer, hidden, ids, weights)
            assert sent.ranks == [1]
            remote.combine(sent, torch.zeros(4, HIDDEN))
        remote.stop()
    assert not group.errors, group.errors
    assert group.served == {1: NUM_LAYERS, 2: 0}


def test_a_rank_left_without_rows_for_longer_than_its_timeout_is_kept_alive() -> None:
    """The router keeps dispatching to rank 1 only, for longer than the ranks' 1 s timeout: rank 2 must
    get HEARTBEATs meanwhile, or its receive times out and its loop fails."""
    k = 1
    placement, gen, _, group = _fp32_group(4, 2, k, seed=4, timeout_s=1)
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), k, keepalive_s=0.2)
        ids, weights = _routing(2, k, placement.experts_of(0), gen)
        hidden = torch.randn(2, HIDDEN, generator=gen)
        layers, deadline = 0, time.monotonic() + 2.0
        while time.monotonic() < deadline:
            remote.combine(remote.dispatch(0, hidden, ids, weights), torch.zeros(2, HIDDEN))
            layers += 1
        remote.stop()
    assert not group.errors, group.errors
    assert group.served == {1: layers, 2: 0}


def test_release_ends_the_live_ranks_loops_at_once() -> None:
    """What ModelInstance.rebuild does after a failure: the live ranks stop long before their 30 s timeout."""
    placement, gen, _, group = _fp32_group(4, 2, 1, seed=3, timeout_s=30)
    remote = TransportExperts(group.router, _on_every_layer(placement), 1)
    ids, weights = _routing(2, 1, list(range(4)), gen)
    remote.dispatch(0, torch.randn(2, HIDDEN, generator=gen), ids, weights)  # never combined
    started = time.monotonic()
    remote.release()
    for thread in group.threads:
        thread.join(timeout=10)
    group.router.close()
    assert time.monotonic() - started < 10
    assert not group.errors, group.errors
    assert sum(group.served.values()) == len({int(placement.shard_of[e]) for e in ids.flatten()})


def test_a_dead_expert_rank_is_a_transport_error_on_the_router() -> None:
    """The step fails at its dispatch if gloo has seen the rank close its connection by then, else at
    its combine when nobody answers; either way as a TransportError, never a hang."""
    placement, gen, _, group = _fp32_group(4, 1, 2, seed=2, timeout_s=2)
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), 2)
        remote.stop()
        ids, weights = _routing(3, 2, list(range(4)), gen)
        with pytest.raises(TransportError):
            sent = remote.dispatch(0, torch.randn(3, HIDDEN, generator=gen), ids, weights)
            remote.combine(sent, torch.zeros(3, HIDDEN))


def test_transport_experts_checks_the_world_size() -> None:
    placement = ExpertPlacement(8, 3)
    with pytest.raises(ValueError, match="placement needs 4"):
        TransportExperts(types.SimpleNamespace(world_size=3), _on_every_layer(placement), 2)


@pytest.mark.parametrize("closed_first", [False, True], ids=["ends-mid-step", "closed-before-step"])
def test_fail_over_drains_the_failed_step_and_goes_on_without_the_dead_rank(closed_first: bool) -> None:
    """Every expert on two of three shards; rank 2's loop ends before a step (as a killed actor's
    would; `closed_first`: and it closed its connection before the step began). The step fails naming
    rank 2: at its dispatch if gloo has seen the connection closed by then, else at its combine, with
    rank 3's answer unread. Either way rank 1's answer is unread. After
    fail_over to the placement without shard 1, the stale answers are drained and the re-run step
    equals the local experts on the same placement; heartbeats and STOP skip the absent rank."""
    num_experts, k = 6, 2
    gen = torch.Generator().manual_seed(11)
    placement = ExpertPlacement(num_experts, 3, redundant=num_experts)
    gate_up, down = _experts(num_experts, gen)
    shards = _shards(_on_every_layer(placement), gate_up, down, torch.float32)
    group = ExpertGroup(shards, k, torch.float32, timeout_s=2)
    with group:
        remote = TransportExperts(group.router, _on_every_layer(placement), k)
        ids, weights = _routing(9, k, list(range(num_experts)), gen)
        hidden = torch.randn(9, HIDDEN, generator=gen)
        remote.transport.send(2, [0, 0, 0, 0])  # STOP: rank 2 answers nothing from now on
        if closed_first:
            group.threads[1].join(timeout=10)
        reached_combine = False
        with pytest.raises(TransportError) as failed:
            sent = remote.dispatch(0, hidden, ids, weights)
            assert sent.ranks == [1, 2, 3], "precondition: the step needs every rank"
            reached_combine = True
            remote.combine(sent, torch.zeros(9, HIDDEN))
        assert failed.value.rank == 2
        degraded = placement.without_ranks({1})
        remote.fail_over(_on_every_layer(degraded), absent={2})
        local = LocalExperts(shards, _on_every_layer(degraded))
        want = local.combine(local.dispatch(0, hidden, ids, weights), _shared(hidden))
        again = remote.dispatch(0, hidden, ids, weights)
        assert again.ranks == [1, 3]
        torch.testing.assert_close(remote.combine(again, _shared(hidden)), want, atol=1e-6, rtol=0)
        remote.heartbeat()
        remote.stop()
    assert not group.errors, group.errors
    assert group.served == {1: 2, 2: 0, 3: 2 if reached_combine else 1}
