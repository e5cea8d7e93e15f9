"""Serve autoscaling policy for the engine: scale on running + waiting sequences per replica."""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

POLICY_PATH = "cluster.serve.autoscaling:ongoing_sequences_policy"


def ongoing_sequences_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Desired replicas = total ongoing sequences / target per replica.

    Falls back to Serve's request count before the replicas report (e.g. while they start). Serve
    applies min/max replicas and the up/down-scale delays around this.
    """
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    per_replica = (ctx.aggregated_metrics or {}).get("ongoing_sequences") or {}
    ongoing = sum(per_replica.values()) if per_replica else ctx.total_num_requests
    return ongoing / ctx.config.get_target_ongoing_requests(), {}
