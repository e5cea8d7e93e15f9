"""Online expert load balancing (EPLB) of one model instance, run by the engine thread between steps.

Every `interval_s` the router's per-expert load of the last window (router/exchange.py ExpertLoad)
goes through the balancer (experts/balancer.py). A new placement is prepared by every expert actor
beside its live slots (its Ray thread that does not serve: the loop keeps computing with the old
ones), and once all of them are ready the router sends SWITCH to every rank and dispatches with the
new placement from the next MoE layer on: between two steps, so no step mixes two placements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from experts.balancer import imbalance, rebalance
from experts.placement import ExpertPlacement
from router.exchange import TransportExperts

log = logging.getLogger(__name__)


@dataclass
class Rebalance:
    """One rebalance, prepared or done: the imbalance on its window's load before and after."""

    placement: ExpertPlacement
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
    ) -> None:
        self._experts, self._actors = experts, actors
        self.interval_s = interval_s
        self._due = time.monotonic() + interval_s
        self._pending: tuple[Rebalance, list[ray.ObjectRef]] | None = None
        self.done: list[Rebalance] = []

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_moved for r in self.done)

    def tick(self) -> None:
        """At a step boundary: switches to a placement every actor has prepared, or starts one when due."""
        if self._pending is not None:
            self._finish()
            return
        now = time.monotonic()
        if now < self._due:
            return
        self._due = now + self.interval_s
        experts = self._experts()
        load = experts.load.take()
        current = experts.placement
        placement = rebalance(load, current)
        if placement == current:
            return
        version = experts.version + 1
        plan = Rebalance(placement, version, imbalance(current, load), imbalance(placement, load))
        refs = [
            actor.prepare.remote(version, placement.experts_of(shard))
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
