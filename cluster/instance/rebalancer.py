"""Online expert load balancing (EPLB) of one model instance, run by the engine thread between steps.

Every `interval_s` the router's per-layer, per-expert load of the last `window_s` (a sliding window:
router/exchange.py ExpertLoad's running totals, read every window_s / WINDOW_READINGS) goes through
the balancer (experts/balancer.py), each MoE layer on its own. A new placement is prepared by every
expert actor beside its live slots (its Ray thread that does not serve: the loop keeps computing with
the old ones), and once all of them are ready the router sends SWITCH to every rank and dispatches
with the new placement from the next MoE layer on: between two steps, so no step mixes two placements.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from experts.balancer import rebalance_model, step_imbalance
from experts.placement import ModelPlacement
from router.exchange import TransportExperts

log = logging.getLogger(__name__)

WINDOW_READINGS = 8  # readings of the running load per window: its start is known to window_s / 8


class LoadWindow:
    """The routed load of the last `window_s` seconds, from running totals (ExpertLoad.total) read every
    window_s / WINDOW_READINGS: the totals now minus the oldest reading kept."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._readings: deque[tuple[float, torch.Tensor]] = deque(maxlen=WINDOW_READINGS + 1)

    def read(self, now: float, total: Callable[[], torch.Tensor]) -> None:
        """Keeps `total()` when a reading is due (the first one at once)."""
        if not self._readings or now - self._readings[-1][0] >= self.window_s / WINDOW_READINGS:
            self._readings.append((now, total()))

    def load(self, total: torch.Tensor) -> torch.Tensor:
        return total - self._readings[0][1] if self._readings else total


@dataclass
class Rebalance:
    """One rebalance, prepared or done: the step imbalance (experts/balancer.step_imbalance) on its
    window's load before and after."""

    placement: ModelPlacement
    version: int
    before: float
    after: float
    bytes_moved: int = 0


class Rebalancer:
    def __init__(
        self,
        experts: Callable[[], TransportExperts],
        actors: Callable[[], list[ray.actor.ActorHandle]],
        interval_s: float,
        window_s: float,
    ) -> None:
        self._experts, self._actors = experts, actors
        self.interval_s = interval_s
        self._due = time.monotonic() + interval_s
        self.window = LoadWindow(window_s)
        self._pending: tuple[Rebalance, list[ray.ObjectRef]] | None = None
        self.done: list[Rebalance] = []

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_moved for r in self.done)

    def tick(self) -> None:
        """At a step boundary: switches to a placement every actor has prepared, or starts one when due."""
        now = time.monotonic()
        experts = self._experts()
        self.window.read(now, experts.load.total)
        if self._pending is not None:
            self._finish()
            return
        if now < self._due:
            return
        self._due = now + self.interval_s
        load = self.window.load(experts.load.total())
        current = experts.placement
        placement = rebalance_model(load, current)
        if placement == current:
            return
        version = experts.version + 1
        plan = Rebalance(placement, version, step_imbalance(current, load), step_imbalance(placement, load))
        refs = [
            actor.prepare.remote(version, placement.slots_of(shard))
            for shard, actor in enumerate(self._actors())
        ]
        self._pending = (plan, refs)

    def _finish(self) -> None:
        plan, refs = self._pending
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs):
            return
        self._pending = None
        try:
            plan.bytes_moved = sum(ray.get(ready))
        except ray.exceptions.RayError as err:  # an actor died: the group's recovery replaces it
            log.warning("dropped rebalance to version %d: %s", plan.version, err)
            return
        self._experts().switch(plan.placement, plan.version)
        self.done.append(plan)
        log.info(
            "rebalanced experts (version %d): imbalance %.2f -> %.2f, %d bytes loaded",
            plan.version,
            plan.before,
            plan.after,
            plan.bytes_moved,
        )

    def cancel(self) -> None:
        """The group is re-formed: a rebalance still being prepared is dropped (the actors too drop it)."""
        self._pending = None

    def info(self) -> dict:
        return {
            "rebalances": len(self.done),
            "bytes_moved": self.bytes_moved,
            "imbalance": [(r.before, r.after) for r in self.done],
        }
