"""Operator metrics through Ray's metrics agent: every name here is exported as `ray_<name>`.

The hot paths only add to plain counters (`router/` keeps them: the engine core's per-step StepStats, the
expert loop's ExpertStats) and this module turns those into Ray metrics, aggregated per engine step or
per flush interval, never per token. It reads what the engine core exposes (`last_step`, `occupancy()`,
`placement`) and nothing behind it; whether steps carry timing detail is the core's own option.

- per request (ingress): `moe_requests_total{status}`, the HTTP status each request ended with
  (499: the client went away mid-stream; an error reported inside a started stream counts as its code);
- per request (engine loop): time to first token and end-to-end latency histograms, prompt tokens;
- per step (engine loop): step duration, sequences and tokens per step, and one inter-token latency
  observation: the gap since the previous token-producing step, which every decoding sequence of the
  step waited (so its percentiles are over steps, not tokens);
- per flush interval (engine loop): running and waiting sequences, KV-cache usage and blocks in use per
  layer group, prefix-cache queries and hits (in prompt tokens), preemptions, generated tokens,
  step time split by phase, exchange bytes, tokens routed per expert (totals over layers; per
  (layer, expert) only with `expert_layer_metrics`), per-layer rank imbalance, expert health/restarts;
- per flush interval (expert actors): expert compute time and rows received per shard.

Ray exports counters with a `_total` suffix and histograms as `_bucket`/`_sum`/`_count`; a histogram's
`_sum` is rebuilt by Ray from bucket midpoints, so means from it are approximate (percentiles are not
affected).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ray.util.metrics import Counter, Gauge, Histogram

from cluster.metrics.common import (
    BATCH_SEQUENCES_BUCKETS,
    BATCH_TOKENS_BUCKETS,
    ENGINE_TAGS,
    FLUSH_INTERVAL_S,
    GAUGE_REFRESH_S,
    REQUEST_LATENCY_BUCKETS_S,
    STEP_LATENCY_BUCKETS_S,
    Delta,
    rank_imbalance,
)
from router.engine_core import EngineCore, TokenEvent
from router.exchange import ExchangeStats
from router.step_stats import StepStats


class _Pending:
    """Step stats summed since the last flush."""

    def __init__(self) -> None:
        self.forward = self.attention = self.gate = self.host = 0.0
        self.exchange = ExchangeStats()
        self.expert_tokens: dict[int, torch.Tensor] = {}

    def add(self, step: StepStats, host_seconds: float) -> None:
        self.forward += step.forward_seconds
        self.attention += step.attention_seconds
        self.gate += step.gate_seconds
        self.host += host_seconds  # step time outside the model forward (schedule, batch, sample)
        self.exchange.add(step.exchange)
        for layer, tokens in step.expert_tokens.items():
            total = self.expert_tokens.get(layer)
            self.expert_tokens[layer] = tokens if total is None else total + tokens


@dataclass
class ExpertGroupState:
    """The expert group now, as the model instance sees it (ModelInstance.group_state)."""

    ranks_in_group: int  # expert ranks whose loop runs
    experts_without_replica: int  # (layer, expert) pairs a lost rank left with one copy or none
    failovers: int = 0  # steps re-run on the surviving ranks after one died
    rebalances: int = 0
    rebalance_bytes: int = 0  # expert weights read into new slots by all rebalances
    last_rebalance: tuple[float, float] | None = None  # imbalance before, after (on its window's load)


class EngineMetrics:
    """The router's metrics, fed by the engine loop thread (and `request_*` from the event loop).

    `experts_alive` and `expert_restarts` report the expert actors' health and how many were replaced.
    """

    def __init__(
        self,
        core: EngineCore,
        model: str,
        instance: str,
        experts_alive: Callable[[], bool],
        expert_restarts: Callable[[], int],
        expert_layer_metrics: bool = False,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        group_state: Callable[[], ExpertGroupState] | None = None,
    ) -> None:
        self.core = core
        self._group_state = group_state
        self._experts_alive = experts_alive
        self._expert_restarts = expert_restarts
        self.flush_interval_s = flush_interval_s
        tags = {"model": model, "model_instance": instance}

        def counter(name: str, doc: str, *keys: str) -> Counter:
            return Counter(name, doc, tag_keys=ENGINE_TAGS + keys).set_default_tags(tags)

        def gauge(name: str, doc: str, *keys: str) -> Gauge:
            return Gauge(name, doc, tag_keys=ENGINE_TAGS + keys).set_default_tags(tags)

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, boundaries=buckets, tag_keys=ENGINE_TAGS).set_default_tags(tags)

        self.ttft = histogram(
            "moe_time_to_first_token_seconds",
            "From a request's arrival at the engine to its first token",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.e2e = histogram(
            "moe_e2e_request_latency_seconds",
            "From a request's arrival at the engine to its last token",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.itl = histogram(
            "moe_inter_token_latency_seconds",
            "Gap between consecutive tokens of the decoding sequences, one observation per step",
            STEP_LATENCY_BUCKETS_S,
        )
        self.step_time = histogram(
            "moe_step_duration_seconds", "Engine step: schedule, forward, sample", STEP_LATENCY_BUCKETS_S
        )
        self.batch_sequences = histogram(
            "moe_batch_sequences", "Sequences in an engine step", BATCH_SEQUENCES_BUCKETS
        )
        self.batch_tokens = histogram("moe_batch_tokens", "Tokens in an engine step", BATCH_TOKENS_BUCKETS)
        self.prompt_tokens = counter("moe_prompt_tokens", "Prompt tokens prefilled (counted at first token)")
        self.generation_tokens = counter("moe_generation_tokens", "Tokens generated")
        self.running = gauge("moe_running_sequences", "Sequences being computed (holding KV blocks)")
        self.waiting = gauge("moe_waiting_sequences", "Sequences waiting for admission")
        self.kv_usage = gauge("moe_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use")
        self.kv_blocks = gauge(
            "moe_kv_cache_blocks_in_use", "KV-cache blocks referenced by running sequences", "group"
        )
        self.prefix_queries = counter(
            "moe_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (at first admission)"
        )
        self.prefix_hits = counter("moe_prefix_cache_hits", "Prompt tokens the prefix cache supplied")
        self.preemptions = gauge(  # a gauge, as moe_expert_restarts below: it must exist at 0
            "moe_preemptions", "Sequences preempted for lack of KV blocks (recomputed later) since start"
        )
        self.phase_seconds = counter(
            "moe_step_phase_seconds", "Router time per step phase (attention, dense, gate, ...)", "phase"
        )
        self.exchange_bytes = counter(
            "moe_exchange_bytes", "Bytes the router dispatched to expert ranks (payload, meta)", "kind"
        )
        self.expert_tokens = counter(
            "moe_expert_tokens", "(token, expert) pairs routed to each expert, over all layers", "expert"
        )
        self.layer_expert_tokens = (
            counter(
                "moe_expert_layer_tokens", "(token, expert) pairs per layer and expert", "layer", "expert"
            )
            if expert_layer_metrics
            else None
        )
        self.imbalance = gauge(
            "moe_expert_imbalance",
            "Per MoE layer: max / mean (token, expert) pairs per expert rank over the last flush interval",
            "layer",
        )
        self.alive = gauge("moe_experts_alive", "1 while every expert actor's loop runs, else 0")
        # A gauge, not a counter: Ray cannot export a counter at 0, and a counter series that first
        # appears at 1 hides the first restart from increase().
        self.restarts = gauge("moe_expert_restarts", "Expert actors replaced since the replica started")
        # Gauges since start, as restarts, for the same reason.
        self.replicas = gauge(
            "moe_expert_replicas", "Replicas of each logical expert, the fewest of any MoE layer", "expert"
        )
        self.rebalances = gauge("moe_expert_rebalances", "Online rebalancings of the expert placement")
        self.rebalance_bytes = gauge(
            "moe_expert_rebalance_bytes", "Expert weight bytes read into new slots by the rebalancings"
        )
        self.rebalance_imbalance = gauge(
            "moe_expert_rebalance_imbalance",
            "Step imbalance (per layer max / mean rank load, summed) of the last rebalancing's window",
            "when",
        )
        self.failovers = gauge(
            "moe_expert_failovers", "Expert-rank losses served on at once by the other ranks' replicas"
        )
        self.ranks_in_group = gauge("moe_expert_ranks_in_group", "Expert ranks serving in the group now")
        self.without_replica = gauge(
            "moe_experts_without_replica",
            "(MoE layer, expert) pairs a lost expert rank left with one copy or none, until it rejoins",
        )

        self._waiting_first: dict[str, tuple[float, int]] = {}  # request -> (arrival, prompt tokens)
        self._started: dict[str, float] = {}  # request with a first token -> arrival
        self._last_emit: float | None = None
        self._seen_step = core.last_step
        self._generated = 0
        self._prompt = 0
        self._pending = _Pending()
        self._deltas = {name: Delta() for name in ("generated", "prompt", "queries", "hits")}
        self._next_flush = 0.0
        self._gauges: dict[tuple, tuple[Gauge, float, dict[str, str] | None]] = {}
        self._gauges_lock = threading.Lock()
        threading.Thread(target=self._refresh_gauges, name="metrics-gauges", daemon=True).start()

    def request_arrived(self, request_id: str, prompt_tokens: int) -> None:
        self._waiting_first[request_id] = (time.perf_counter(), prompt_tokens)

    def request_dropped(self, request_id: str) -> None:
        """A request that ended without its last token (rejected, aborted, engine stopped)."""
        self._waiting_first.pop(request_id, None)
        self._started.pop(request_id, None)

    def step_done(self, events: list[TokenEvent], started: float) -> None:
        """After each engine loop step; `started` is perf_counter() before core.step()."""
        now = time.perf_counter()
        step = self.core.last_step
        if step is not None and step is not self._seen_step:
            self._seen_step = step
            self.step_time.observe(now - started)
            self.batch_sequences.observe(step.sequences)
            self.batch_tokens.observe(step.tokens)
            self._pending.add(step, max(0.0, now - started - step.forward_seconds))
        decoding = False
        for event in events:
            first = self._waiting_first.pop(event.request_id, None)
            if first is not None:
                self.ttft.observe(now - first[0])
                self._prompt += first[1]
                self._started[event.request_id] = first[0]
            else:
                decoding = True
            if event.finish_reason is not None:
                arrived = self._started.pop(event.request_id, None)
                if arrived is not None:
                    self.e2e.observe(now - arrived)
        if events:
            if decoding and self._last_emit is not None:
                self.itl.observe(now - self._last_emit)
            self._last_emit = now
            self._generated += len(events)
        if now >= self._next_flush:
            self.flush()

    def idle(self) -> None:
        """The engine has no work: publish the idle state now, and restart the token gap clock."""
        self._last_emit = None
        self.flush()

    def flush(self) -> None:
        """Counters and gauges from the accumulated plain counters; runs on the engine loop thread."""
        self._next_flush = time.perf_counter() + self.flush_interval_s
        d, pending = self._deltas, self._pending
        self._pending = _Pending()
        occupancy = self.core.occupancy()
        self._set(self.running, occupancy.running)
        self._set(self.waiting, occupancy.waiting)
        self._set(self.kv_usage, occupancy.kv_usage)
        self._set(self.kv_blocks, occupancy.full_blocks_used, {"group": "full"})
        self._set(self.kv_blocks, occupancy.sliding_blocks_used, {"group": "sliding"})
        self._inc(self.prefix_queries, d["queries"](occupancy.prefix_query_tokens))
        self._inc(self.prefix_hits, d["hits"](occupancy.prefix_hit_tokens))
        self._set(self.preemptions, occupancy.preemptions)
        self._inc(self.generation_tokens, d["generated"](self._generated))
        self._inc(self.prompt_tokens, d["prompt"](self._prompt))
        exchange = pending.exchange
        phases = {
            "attention": pending.attention,
            "dense": max(0.0, pending.forward - pending.attention - pending.gate - exchange.wait_seconds),
            "gate": pending.gate,
            "exchange": exchange.wait_seconds,
            "schedule_sample": pending.host,
        }
        for phase, seconds in phases.items():
            self._inc(self.phase_seconds, seconds, {"phase": phase})
        self._inc(self.exchange_bytes, exchange.payload_bytes, {"kind": "payload"})
        self._inc(self.exchange_bytes, exchange.meta_bytes, {"kind": "meta"})
        self._flush_experts(pending.expert_tokens)
        self._set(self.alive, 1.0 if self._experts_alive() else 0.0)
        self._set(self.restarts, self._expert_restarts())
        self._flush_group()

    def _flush_group(self) -> None:
        counts = torch.stack([layer.replica_count for layer in self.core.placement.layers])
        for expert, count in enumerate(counts.min(0).values.tolist()):
            self._set(self.replicas, count, {"expert": str(expert)})
        if self._group_state is None:
            return
        state = self._group_state()
        self._set(self.ranks_in_group, state.ranks_in_group)
        self._set(self.without_replica, state.experts_without_replica)
        self._set(self.failovers, state.failovers)
        self._set(self.rebalances, state.rebalances)
        self._set(self.rebalance_bytes, state.rebalance_bytes)
        if state.last_rebalance is not None:
            for when, value in zip(("before", "after"), state.last_rebalance, strict=True):
                self._set(self.rebalance_imbalance, value, {"when": when})

    def _flush_experts(self, per_layer: dict[int, torch.Tensor]) -> None:
        if not per_layer:
            return
        decoder_layer = self.core.config.moe_layers  # MoE ordinal -> decoder layer (the label)
        counts = {layer: tokens.cpu() for layer, tokens in per_layer.items()}
        totals = torch.stack(list(counts.values())).sum(0)
        for expert in totals.nonzero().flatten().tolist():
            self.expert_tokens.inc(int(totals[expert]), {"expert": str(expert)})
        for layer, tokens in counts.items():
            ratio = rank_imbalance(tokens, self.core.placement.layer(layer))
            if ratio is not None:
                self._set(self.imbalance, ratio, {"layer": str(decoder_layer[layer])})
            if self.layer_expert_tokens is not None:
                for expert in tokens.nonzero().flatten().tolist():
                    tags = {"layer": str(decoder_layer[layer]), "expert": str(expert)}
                    self.layer_expert_tokens.inc(int(tokens[expert]), tags)

    @staticmethod
    def _inc(counter: Counter, value: float, tags: dict[str, str] | None = None) -> None:
        if value > 0:
            counter.inc(value, tags)

    def _set(self, gauge: Gauge, value: float, tags: dict[str, str] | None = None) -> None:
        gauge.set(value, tags)
        with self._gauges_lock:
            self._gauges[(id(gauge), *sorted((tags or {}).items()))] = (gauge, value, tags)

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._gauges_lock:
                latest = list(self._gauges.values())
            for gauge, value, tags in latest:
                gauge.set(value, tags)
