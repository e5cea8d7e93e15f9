"""Dispatch plan, expert-side compute and the dispatch/combine exchange, all in one process.

The collective tests run the real gloo transport: the router (rank 0) in the test's thread and every
expert rank in a thread of its own, each with its own process group on loopback.
"""

import socket
import threading
import types

import pytest
import torch
import torch.nn.functional as F

from cluster.transport.gloo import GlooTransport
from experts.placement import ExpertPlacement
from experts.shard import ExpertShard
from router.exchange import (
    CollectiveExperts,
    LocalExperts,
    pack_rows,
    plan_dispatch,
    row_width,
    run_expert_loop,
    unpack_rows,
)

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


def _shards(
    placement: ExpertPlacement, gate_up: list[torch.Tensor], down: list[torch.Tensor], dtype: torch.dtype
) -> list[ExpertShard]:
    shards = []
    for shard in range(placement.num_shards):
        owned = torch.tensor(placement.experts_of(shard))
        shards.append(ExpertShard([g[owned].to(dtype) for g in gate_up], [d[owned].to(dtype) for d in down]))
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


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
def test_local_experts_equal_dense_reference(num_shards: int, strategy: str) -> None:
    num_experts, k = 10, 3
    gen = torch.Generator().manual_seed(num_shards)
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    gate_up, down = _experts(num_experts, gen)
    local = LocalExperts(_shards(placement, gate_up, down, torch.float32), placement)
    for name, ids, weights in _edge_routings(placement, k, gen):
        for layer in range(NUM_LAYERS):
            hidden = torch.randn(ids.shape[0], HIDDEN, generator=gen)
            out = local(layer, hidden, ids, weights, lambda h=hidden: _shared(h))
            ref = _dense_reference(layer, hidden, ids, weights, gate_up, down)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=f"{name}, layer {layer}")


def test_idle_shard_routing_really_leaves_a_shard_without_rows() -> None:
    placement = ExpertPlacement(10, 3)
    gen = torch.Generator().manual_seed(0)
    routings = {name: (ids, w) for name, ids, w in _edge_routings(placement, 3, gen)}
    ids, weights = routings["idle shard"]
    assert plan_dispatch(ids, weights, placement).shard_counts[2] == 0
    ids, _ = routings["unused expert"]
    assert not (ids == placement.experts_of(0)[0]).any()


# ---------------------------------------------------------------------------------------------- collective


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
def test_collective_experts_over_gloo_equal_local_experts(
    num_experts: int, num_shards: int, strategy: str, dtype: torch.dtype
) -> None:
    k = 3
    gen = torch.Generator().manual_seed(num_experts * 10 + num_shards)
    placement = ExpertPlacement(num_experts, num_shards, strategy)
    gate_up, down = _experts(num_experts, gen)
    shards = _shards(placement, gate_up, down, dtype)
    local = LocalExperts(shards, placement)
    steps = _step_routings(placement, k, gen)
    inputs = [[torch.randn(ids.shape[0], HIDDEN, generator=gen).to(dtype) for ids, _ in s] for s in steps]

    address = f"127.0.0.1:{_free_port()}"
    world = num_shards + 1
    served: dict[int, int] = {}
    errors: list[BaseException] = []

    def expert_rank(rank: int) -> None:
        try:
            transport = GlooTransport(address, rank, world, timeout_s=15)
            try:
                served[rank] = run_expert_loop(transport, shards[rank - 1], k, dtype)
            finally:
                transport.close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=expert_rank, args=(r,), daemon=True) for r in range(1, world)]
    for thread in threads:
        thread.start()
    router = GlooTransport(address, 0, world, timeout_s=15)
    try:
        collective = CollectiveExperts(router, placement, k)
        for step, step_inputs in zip(steps, inputs, strict=True):
            collective.begin_step(step[0][0].shape[0])
            for layer, ((ids, weights), hidden) in enumerate(zip(step, step_inputs, strict=True)):
                before = collective.stats.payload_bytes, collective.stats.meta_bytes
                got = collective(layer, hidden, ids, weights, lambda h=hidden: _shared(h))
                rows = sum(_distinct_shards(ids, placement))
                # bytes per MoE layer: each token once per distinct destination shard
                assert collective.stats.payload_bytes - before[0] == rows * HIDDEN * dtype.itemsize
                assert collective.stats.meta_bytes - before[1] == rows * 2 * k * 4
                want = local(layer, hidden, ids, weights, lambda h=hidden: _shared(h))
                assert got.dtype == dtype
                # fp32: the same numbers; bf16: the router sums a token's partial sums in one index_add_,
                # LocalExperts in one per shard, which rounds differently within bf16 precision
                tol = {"atol": 1e-6, "rtol": 0} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
                torch.testing.assert_close(got, want, **tol, msg=f"layer {layer}")
        collective.stop()
    finally:
        router.close()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert served == {r: len(steps) for r in range(1, world)}

    pairs = [(ids, layer) for step in steps for layer, (ids, _) in enumerate(step)]
    rows = sum(sum(_distinct_shards(ids, placement)) for ids, _ in pairs)
    assert collective.stats.rows_sent == rows
    assert collective.stats.payload_bytes == rows * HIDDEN * dtype.itemsize
    assert collective.stats.meta_bytes == rows * 2 * k * 4
    assert collective.stats.seconds > 0


def test_collective_experts_checks_the_world_size() -> None:
    placement = ExpertPlacement(8, 3)
    with pytest.raises(ValueError, match="placement needs 4"):
        CollectiveExperts(types.SimpleNamespace(world_size=3), placement, 2)
