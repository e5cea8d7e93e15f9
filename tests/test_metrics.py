"""cluster.metrics in one process: what the engine loop and the ingress record, with Ray's metric
classes replaced by recorders (tests/test_prometheus.py checks the real export end to end)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

import pytest
import torch

from cluster.demo import write_checkpoint
from cluster.metrics import engine as metrics_module
from cluster.metrics import experts as expert_metrics
from cluster.metrics import requests as request_metrics
from cluster.metrics.common import rank_imbalance
from cluster.metrics.engine import EngineMetrics, ExpertGroupState
from cluster.metrics.experts import ExpertMetrics
from cluster.serve import ingress, streaming
from cluster.serve.protocol import OpenAIError
from experts.placement import ExpertPlacement, ModelPlacement
from router.engine_core import EngineCore
from router.expert_loop import ExpertStats
from router.sampling import SamplingParams
from router.step_stats import StepTotals
from tests.toolkit import local_core


class Recorder:
    """Stands in for ray.util.metrics.Counter/Gauge/Histogram: keeps every point with its tags."""

    registry: ClassVar[dict[str, Recorder]] = {}

    def __init__(self, name: str, description: str = "", boundaries=None, tag_keys=()) -> None:
        self.name, self.tag_keys, self.boundaries = name, tuple(tag_keys), boundaries
        self.default: dict[str, str] = {}
        self.points: list[tuple[float, dict[str, str]]] = []
        Recorder.registry[name] = self

    def set_default_tags(self, tags: dict[str, str]) -> Recorder:
        assert set(tags) <= set(self.tag_keys)
        self.default = tags
        return self

    def record(self, value: float, tags: dict[str, str] | None = None) -> None:
        final = {**self.default, **(tags or {})}
        assert set(final) == set(self.tag_keys), f"{self.name}: tags {final} vs {self.tag_keys}"
        self.points.append((value, final))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "Ray's Counter refuses increments <= 0"
        self.record(value, tags)

    observe = set = record

    def total(self, **tags: str) -> float:
        return sum(v for v, t in self.points if all(t.get(k) == w for k, w in tags.items()))

    def last(self, **tags: str) -> float:
        return [v for v, t in self.points if all(t.get(k) == w for k, w in tags.items())][-1]

    def by(self, key: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for value, tags in self.points:
            out[tags[key]] += value
        return dict(out)


@pytest.fixture
def recorded(monkeypatch) -> Iterator[dict[str, Recorder]]:
    Recorder.registry = {}
    for module in (metrics_module, request_metrics, expert_metrics):
        for name in ("Counter", "Gauge", "Histogram"):
            monkeypatch.setattr(module, name, Recorder, raising=False)
    yield Recorder.registry


def run(core: EngineCore, metrics: EngineMetrics | None, prompts: dict[str, list[int]], new: int) -> None:
    """What EngineLoop does: announce each request, step until done, report each step."""
    for request_id, prompt in prompts.items():
        if metrics:
            metrics.request_arrived(request_id, len(prompt))
        core.add_request(prompt, SamplingParams(max_tokens=new, ignore_eos=True), request_id=request_id)
    while core.has_work():
        started = time.perf_counter()
        events = core.step()
        if metrics:
            metrics.step_done(events, started)
    if metrics:
        metrics.idle()


def test_rank_imbalance_is_max_over_mean_per_rank():
    placement = ExpertPlacement(4, 2)  # experts 0, 1 on rank 1; 2, 3 on rank 2
    assert rank_imbalance(torch.tensor([4, 0, 0, 0]), placement) == pytest.approx(2.0)
    assert rank_imbalance(torch.tensor([1, 3, 2, 2]), placement) == pytest.approx(1.0)
    assert rank_imbalance(torch.tensor([3, 0, 1, 0]), placement) == pytest.approx(1.5)
    assert rank_imbalance(torch.zeros(4, dtype=torch.int64), placement) is None
    replicated = ExpertPlacement.from_slots(4, [[0, 1], [2, 3, 0]])  # expert 0's pairs split in two
    assert rank_imbalance(torch.tensor([4, 0, 0, 0]), replicated) == pytest.approx(1.0)


def test_engine_metrics_aggregate_requests_steps_and_experts(recorded, demo_model):
    core = local_core(demo_model)
    restarts = iter(range(100))
    metrics = EngineMetrics(
        core, "demo", "inst-1", lambda: True, lambda: next(restarts), True, flush_interval_s=3600
    )
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [12, 13, 14], "c": list(range(20, 60))}
    run(core, metrics, prompts, new=6)

    assert len(recorded["moe_time_to_first_token_seconds"].points) == 3
    assert len(recorded["moe_e2e_request_latency_seconds"].points) == 3
    steps = len(recorded["moe_step_duration_seconds"].points)
    assert steps == core.totals.steps and steps >= 6
    assert 0 < len(recorded["moe_inter_token_latency_seconds"].points) < steps
    assert recorded["moe_generation_tokens"].total() == 3 * 6
    assert recorded["moe_prompt_tokens"].total() == sum(map(len, prompts.values()))
    computed = recorded["moe_batch_tokens"].total()
    assert computed == sum(map(len, prompts.values())) + 3 * 5  # the last sampled token is not fed back
    assert max(v for v, _ in recorded["moe_batch_sequences"].points) == 3

    config = core.config
    pairs = computed * config.num_experts_per_tok
    per_expert = recorded["moe_expert_tokens"].by("expert")
    assert sum(per_expert.values()) == pairs * len(config.moe_layers)
    assert set(per_expert) <= {str(e) for e in range(config.num_experts)}
    per_layer = recorded["moe_expert_layer_tokens"].by("layer")
    assert per_layer == {str(layer): pairs for layer in config.moe_layers}
    imbalance = recorded["moe_expert_imbalance"]
    assert {t["layer"] for _, t in imbalance.points} == {str(layer) for layer in config.moe_layers}
    assert all(value >= 1.0 for value, _ in imbalance.points)

    phases = recorded["moe_step_phase_seconds"].by("phase")
    assert {"attention", "dense", "gate", "schedule_sample"} <= set(phases)  # no exchange in-process
    assert all(seconds > 0 for seconds in phases.values())
    assert sum(phases.values()) <= sum(v for v, _ in recorded["moe_step_duration_seconds"].points) + 1e-6
    assert recorded["moe_exchange_bytes"].points == []  # LocalExperts moves no bytes

    assert recorded["moe_running_sequences"].last() == 0
    assert recorded["moe_waiting_sequences"].last() == 0
    assert recorded["moe_kv_cache_usage_ratio"].last() == 0.0
    assert recorded["moe_experts_alive"].last() == 1.0
    assert recorded["moe_expert_restarts"].points[-1][0] >= 0
    for recorder in recorded.values():
        assert all(t["model"] == "demo" and t["model_instance"] == "inst-1" for _, t in recorder.points)
    assert metrics._pending.expert_tokens == {}  # consumed by the flush


def test_expert_series_name_the_decoder_layers_of_interleaved_moe_layers(recorded, tmp_path):
    """Qwen3-MoE with decoder_sparse_step=2: MoE on decoder layers 1 and 3, labelled so."""
    sparse = {"decoder_sparse_step": 2, "mlp_only_layers": []}
    model = write_checkpoint(tmp_path / "qwen3", sparse, tokenizer=False, family="qwen3_moe")
    core = local_core(model)
    assert core.config.moe_layers == [1, 3]
    metrics = EngineMetrics(core, "qwen3", "i", lambda: True, lambda: 0, True, flush_interval_s=3600)
    run(core, metrics, {"a": [5, 6, 7, 8], "b": [9, 10]}, new=3)
    pairs = (4 + 2 + 2 * 2) * core.config.num_experts_per_tok
    assert recorded["moe_expert_layer_tokens"].by("layer") == {"1": pairs, "3": pairs}
    assert {t["layer"] for _, t in recorded["moe_expert_imbalance"].points} == {"1", "3"}


def test_prefix_cache_preemption_and_block_metrics(recorded, demo_model):
    core = local_core(demo_model)  # 16-token blocks
    metrics = EngineMetrics(core, "demo", "i", lambda: True, lambda: 0, flush_interval_s=3600)
    prompt = list(range(20, 60))
    run(core, metrics, {"a": prompt}, new=2)
    run(core, metrics, {"b": prompt}, new=2)  # finds a's two full blocks
    assert recorded["moe_prefix_cache_queries"].total() == 2 * len(prompt)
    assert recorded["moe_prefix_cache_hits"].total() == 32
    assert recorded["moe_preemptions"].last() == 0
    blocks = recorded["moe_kv_cache_blocks_in_use"]
    assert max(v for v, _ in blocks.points) > 0
    assert blocks.last(group="full") == blocks.last(group="sliding") == 0


def test_per_layer_expert_series_only_behind_the_flag(recorded, demo_model):
    core = local_core(demo_model)
    metrics = EngineMetrics(core, "demo", "i", lambda: True, lambda: 0, flush_interval_s=3600)
    run(core, metrics, {"a": [5, 6, 7]}, new=3)
    assert "moe_expert_layer_tokens" not in recorded
    assert recorded["moe_expert_tokens"].total() > 0


def test_without_profiling_the_steps_carry_no_phase_times_or_expert_counts(demo_model):
    core = local_core(demo_model, profile=False)
    run(core, None, {"a": [5, 6, 7], "b": [8, 9]}, new=4)
    stats = core.last_step
    assert stats.sequences == 2 and stats.tokens == 2 and stats.forward_seconds > 0
    assert stats.attention_seconds == stats.gate_seconds == 0.0
    assert stats.expert_tokens == {}
    profiled = local_core(demo_model)
    run(profiled, None, {"a": [5, 6, 7], "b": [8, 9]}, new=4)
    assert profiled.last_step.attention_seconds > 0 and profiled.last_step.gate_seconds > 0
    pairs = 2 * profiled.config.num_experts_per_tok
    assert [int(t.sum()) for t in profiled.last_step.expert_tokens.values()] == [pairs] * len(
        profiled.config.moe_layers
    )


def test_dropped_requests_leave_nothing_behind(recorded, demo_model):
    core = local_core(demo_model)
    metrics = EngineMetrics(core, "demo", "i", lambda: False, lambda: 2, flush_interval_s=3600)
    metrics.request_arrived("gone", 3)
    metrics.request_dropped("gone")
    metrics.idle()
    assert "gone" not in metrics._waiting_first and "gone" not in metrics._started
    assert recorded["moe_time_to_first_token_seconds"].points == []
    assert recorded["moe_experts_alive"].last() == 0.0
    assert recorded["moe_expert_restarts"].last() == 2


def test_expert_group_and_rebalancing_gauges(recorded, demo_model):
    core = local_core(demo_model, shards=2)
    state = ExpertGroupState(
        ranks_in_group=1,
        experts_without_replica=3,
        failovers=2,
        rebalances=4,
        rebalance_bytes=1000,
        last_rebalance=(2.5, 1.1),
    )
    # a placement balanced per layer: the last expert has a second replica on layer 0 only
    last = core.config.num_experts - 1
    base = ExpertPlacement(core.config.num_experts, 2)
    first, second = base.experts_of(0), base.experts_of(1)
    core.experts.placement = ModelPlacement(
        [ExpertPlacement.from_slots(last + 1, [[*first, last], [*second, 0]])]
        + [ExpertPlacement.from_slots(last + 1, [[*first, second[0]], [*second, 0]])]
        * (len(core.config.moe_layers) - 1)
    )
    metrics = EngineMetrics(core, "demo", "i", lambda: False, lambda: 0, group_state=lambda: state)
    metrics.idle()
    replicas = {t["expert"]: v for v, t in recorded["moe_expert_replicas"].points}
    assert replicas == {str(e): 2 if e == 0 else 1 for e in range(core.config.num_experts)}
    assert recorded["moe_expert_ranks_in_group"].last() == 1
    assert recorded["moe_experts_without_replica"].last() == 3
    assert recorded["moe_expert_failovers"].last() == 2
    assert recorded["moe_expert_rebalances"].last() == 4
    assert recorded["moe_expert_rebalance_bytes"].last() == 1000
    imbalance = recorded["moe_expert_rebalance_imbalance"]
    assert imbalance.last(when="before") == 2.5 and imbalance.last(when="after") == 1.1


def test_a_reset_of_the_router_counters_does_not_go_negative(recorded, demo_model):
    core = local_core(demo_model)
    metrics = EngineMetrics(core, "demo", "i", lambda: True, lambda: 0, flush_interval_s=3600)
    run(core, metrics, {"a": [5, 6, 7]}, new=3)
    core.totals = StepTotals()  # what RouterActor.stats(reset=True) does
    run(core, metrics, {"b": [5, 6, 7]}, new=3)
    assert all(value > 0 for value, _ in recorded["moe_step_phase_seconds"].points)
    assert recorded["moe_generation_tokens"].total() == 6


def test_expert_metrics_flush_deltas_at_most_once_per_interval(recorded):
    expert = ExpertMetrics("inst", 3, flush_interval_s=3600)
    stats = ExpertStats(dispatches=1, rows=10, compute_seconds=0.5)
    expert.on_dispatch(stats)
    stats.rows, stats.compute_seconds = 25, 0.75
    expert.on_dispatch(stats)  # within the interval: nothing new is exported
    assert recorded["moe_expert_rows"].points == [(10, {"model_instance": "inst", "shard": "3"})]
    expert._next_flush = 0.0
    expert.on_dispatch(stats)
    assert recorded["moe_expert_rows"].total() == 25
    assert recorded["moe_expert_compute_seconds"].total() == pytest.approx(0.75)


async def _drain(chunks: AsyncIterator[dict], close_after: int | None = None) -> None:
    body = streaming.sse(chunks).body_iterator
    seen = 0
    async for _ in body:
        seen += 1
        if close_after is not None and seen == close_after:
            await body.aclose()
            return


def test_ingress_counts_streams_by_how_they_ended(recorded, monkeypatch):
    monkeypatch.setattr(request_metrics, "_requests", None)  # restored afterwards
    request_metrics.start_request_metrics("demo")

    async def tokens(n: int, fail: bool = False) -> AsyncIterator[dict]:
        for i in range(n):
            yield {"i": i}
        if fail:
            raise OpenAIError(503, "engine unavailable", type_="server_error")

    asyncio.run(_drain(tokens(3)))
    asyncio.run(_drain(tokens(2, fail=True)))
    asyncio.run(_drain(tokens(5), close_after=2))
    ingress._error_response(OpenAIError(429, "busy"))
    assert recorded["moe_requests"].by("status") == {"200": 1, "503": 1, "499": 1, "429": 1}
    assert {t["model"] for _, t in recorded["moe_requests"].points} == {"demo"}
