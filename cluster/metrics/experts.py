"""An expert actor's metrics: its compute time and rows, flushed from its loop's callback."""

from __future__ import annotations

import time

from ray.util.metrics import Counter

from cluster.metrics.common import EXPERT_TAGS, FLUSH_INTERVAL_S, Delta
from router.expert_loop import ExpertStats


class ExpertMetrics:
    """An expert actor's metrics: its compute time and rows, flushed from its loop's callback."""

    def __init__(self, instance: str, shard: int, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        tags = {"model_instance": instance, "shard": str(shard)}
        self.compute_seconds = Counter(
            "moe_expert_compute_seconds",
            "Time an expert rank spent in its experts' forward",
            tag_keys=EXPERT_TAGS,
        ).set_default_tags(tags)
        self.rows = Counter(
            "moe_expert_rows",
            "Token rows an expert rank received (once per token and layer)",
            tag_keys=EXPERT_TAGS,
        ).set_default_tags(tags)
        self.flush_interval_s = flush_interval_s
        self._seconds, self._rows = Delta(), Delta()
        self._next_flush = 0.0

    def on_dispatch(self, stats: ExpertStats) -> None:
        now = time.perf_counter()
        if now < self._next_flush:
            return
        self._next_flush = now + self.flush_interval_s
        seconds, rows = self._seconds(stats.compute_seconds), self._rows(stats.rows)
        if seconds > 0:
            self.compute_seconds.inc(seconds)
        if rows > 0:
            self.rows.inc(rows)
