"""What the metrics modules share: histogram buckets, tag names, the model-instance id, deltas."""

from __future__ import annotations

import ray
import torch

from experts.balancer import imbalance
from experts.placement import ExpertPlacement

REQUEST_LATENCY_BUCKETS_S = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
    15.0, 20.0, 30.0, 60.0, 120.0,
]  # fmt: skip
STEP_LATENCY_BUCKETS_S = [
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
]  # fmt: skip
BATCH_SEQUENCES_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
BATCH_TOKENS_BUCKETS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
PHASES = ("attention", "dense", "gate", "exchange", "schedule_sample")
FLUSH_INTERVAL_S = 1.0
# Ray 2.60's metrics agent drops a gauge that was not set for two report intervals (20 s by default),
# even while its process lives and its value holds: the last values are set again this often.
GAUGE_REFRESH_S = 5.0
ENGINE_TAGS = ("model", "model_instance")
EXPERT_TAGS = ("model_instance", "shard")


def model_instance_id() -> str:
    """Names one model instance: its placement group (shared by the router and its expert actors)."""
    context = ray.get_runtime_context()
    return context.get_placement_group_id() or context.get_actor_id() or "driver"


def rank_imbalance(expert_tokens: torch.Tensor, placement: ExpertPlacement) -> float | None:
    """max / mean of the (token, expert) pairs each rank computed (an expert's split evenly over its
    replicas, as the dispatch does); 1.0 is perfect balance, None if idle."""
    return imbalance(placement, expert_tokens)


class Delta:
    """Turns a cumulative value into increments; a value that went down (a reset) counts from zero."""

    def __init__(self, start: float = 0.0) -> None:
        self.last = start

    def __call__(self, value: float) -> float:
        delta = value - self.last if value >= self.last else value
        self.last = value
        return delta
