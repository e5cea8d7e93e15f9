"""Continuous batching behind an asyncio API.

One thread owns the EngineCore and steps it while there is work. Requests arrive from any event
loop through an inbox drained at step boundaries, so a new request joins the running batch at the
next step; each request's tokens flow back through its own asyncio queue. A caller that stops
listening (a client that disconnected) aborts its sequence, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from cluster.errors import EngineStopped, QueueFull, TransportError
from cluster.metrics.engine import EngineMetrics
from router.engine_core import TokenEvent
from router.sampling import SamplingParams
from router.scheduler import Scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_S = 0.1  # how often an idle loop runs `between_steps` while it asked to run again soon


class Heartbeat(Protocol):
    def heartbeat(self) -> None: ...


@runtime_checkable
class LoopCore(Protocol):
    """What EngineLoop needs from its core: router.engine_core.EngineCore, or a test's stand-in."""

    scheduler: Scheduler
    experts: Heartbeat

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[TokenEvent]: ...


@dataclass
class _Listener:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


class EngineLoop:
    def __init__(
        self,
        core: LoopCore,
        recover: Callable[[TransportError], None] | None = None,
        max_recoveries: int = 3,
        heartbeat_s: float = 10.0,
        between_steps: Callable[[], bool] | None = None,
    ) -> None:
        """`recover` repairs the expert group after a TransportError; the step is then run again.

        More than `max_recoveries` failures in a row stop the loop (the replica turns unhealthy). While
        idle, a heartbeat goes to the expert ranks every `heartbeat_s` (keep it below their timeout).
        `between_steps` runs on the engine thread at every step boundary, and while idle; it returns
        True while it wants to run again soon (a replacement expert rank waiting to rejoin).
        """
        self.core = core
        self._heartbeat_s = heartbeat_s
        self._recover = recover
        self._between_steps = between_steps
        self._soon = False
        self._max_recoveries = max_recoveries
        self.recoveries: list[float] = []  # seconds from each failure to the step that succeeded after it
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._listeners: dict[str, _Listener] = {}
        self._pending = 0  # submitted, not yet in the scheduler: counts against max_waiting
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stopped = False
        self.error: BaseException | None = None
        self.metrics: EngineMetrics | None = None  # set by ModelInstance.attach_metrics
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def load(self) -> dict[str, int]:
        """Running and waiting sequences (what Serve's autoscaler counts as ongoing work)."""
        sched = self.core.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting) + self._pending}

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Validates and queues at once (raising InvalidRequest / QueueFull); iterate the result for tokens.

        Call from a running event loop; closing the iterator early aborts the request.
        """
        if not self.alive:
            raise EngineStopped("engine loop is not running") from self.error
        self.core.validate(prompt_ids, params)
        request_id = f"r{next(self._ids)}"
        with self._lock:  # held by the engine thread too while it adds: the check and the add agree
            if not self.core.scheduler.has_room(self._pending):
                waiting = len(self.core.scheduler.waiting) + self._pending
                raise QueueFull(f"all sequence slots taken and {waiting} requests waiting")
            self._pending += 1
        listener = _Listener(asyncio.get_running_loop(), asyncio.Queue())
        self._listeners[request_id] = listener
        if self.metrics is not None:
            self.metrics.request_arrived(request_id, len(prompt_ids))
        self._inbox.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return self._events(request_id, listener)

    async def _events(self, request_id: str, listener: _Listener) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while not finished:
                event = await listener.events.get()
                if isinstance(event, BaseException):
                    raise event
                finished = event.finish_reason is not None
                yield event
        finally:
            self._listeners.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))
                self._wake.set()
                if self.metrics is not None:
                    self.metrics.request_dropped(request_id)

    async def run_in_loop(self, fn: Callable[[LoopCore], T]) -> T:
        """Runs fn on the engine thread between two steps (the core is not thread-safe)."""
        if not self.alive:
            raise EngineStopped("engine loop is not running") from self.error
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", None, fn, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _deliver(self, request_id: str, item: TokenEvent | BaseException) -> None:
        listener = self._listeners.get(request_id)
        if listener is not None:
            listener.loop.call_soon_threadsafe(listener.events.put_nowait, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, request_id, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "abort":
                self.core.abort(request_id)
                continue
            if command == "call":
                fn, future = args
                try:
                    future.set_result(fn(self.core))
                except Exception as err:
                    future.set_exception(err)
                continue
            with self._lock:
                self._pending -= 1
                if request_id not in self._listeners:
                    continue  # gave up before it was scheduled
                try:
                    self.core.add_request(*args, request_id=request_id)
                except (ValueError, QueueFull) as err:  # checked at submit; never let one kill the loop
                    self._deliver(request_id, err)

    def _with_recovery(self, call: Callable[[], T]) -> T:
        failed_at, attempts = None, 0
        while True:
            try:
                result = call()
            except TransportError as err:
                attempts += 1
                if self._recover is None or attempts > self._max_recoveries:
                    raise
                failed_at = failed_at or time.monotonic()
                log.warning("expert group failed (%s); repairing it, attempt %d", err, attempts)
                self._recover(err)
                continue
            if failed_at is not None:
                self.recoveries.append(time.monotonic() - failed_at)
            return result

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._drain_inbox()
                if self._between_steps is not None:
                    self._soon = self._with_recovery(self._between_steps)
                if not self.core.has_work():
                    if self.metrics is not None:
                        self.metrics.idle()
                    if not self._wake.wait(timeout=IDLE_POLL_S if self._soon else self._heartbeat_s):
                        self._with_recovery(self.core.experts.heartbeat)
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                events = self._with_recovery(self.core.step)
                for event in events:
                    self._deliver(event.request_id, event)
                if self.metrics is not None:
                    self.metrics.step_done(events, started)
        except BaseException as err:
            log.exception("engine loop failed")
            self.error = err
        finally:
            self._stopped = True
            failure = EngineStopped(
                f"engine loop stopped: {self.error!r}" if self.error else "engine stopped"
            )
            for request_id in list(self._listeners):
                self._deliver(request_id, failure)
