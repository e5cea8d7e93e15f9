"""Failures of the engine itself: a broken expert group's retries are bounded; a stalled collective.

A stalled collective is made real with SIGSTOP on an expert process and checked through the Engine API,
whose collective timeout can be set (tests/test_chaos.py kills actors under load through Serve).
Recovery durations go to RESULTS_PATH (and to stdout under `pytest -s`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import types
from pathlib import Path

import pytest

from cluster.engine import Engine
from cluster.errors import EngineStopped
from cluster.instance.engine_loop import EngineLoop, LoopCore
from cluster.serve.deployment import EngineDeployment
from router.errors import TransportError
from router.sampling import SamplingParams
from tests.toolkit import StubCore, alive_actors, experts_in, kill, pid_gone, record_result, wait_for

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
MEANWHILE = (Exception,)  # what wait_for tolerates: a group or replica being rebuilt answers with errors
RESULTS_PATH = Path("/tmp/moe_cluster_recovery.json")


def record(key: str, value: object) -> None:
    record_result(RESULTS_PATH, key, value)


def actor_by_pid(class_name: str, pid: int):
    [actor] = [a for a in alive_actors(class_name) if a.pid == pid]
    return actor


# ---------------------------------------------------------------------------------------- bounded retries


class _FailingCore(StubCore):
    """An EngineCore whose every step fails in the transport, as a group broken beyond repair would."""

    def __init__(self) -> None:
        super().__init__(max_num_seqs=4, max_waiting=8)
        self.steps = 0

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self):
        self.steps += 1
        raise TransportError("gloo all_to_all failed: connection reset")


def test_retries_are_bounded_then_the_replica_reports_unhealthy():
    core, rebuilds = _FailingCore(), []
    assert isinstance(core, LoopCore)
    engine = EngineLoop(core, recover=lambda err: rebuilds.append(time.monotonic()), max_recoveries=3)

    async def one_request() -> None:
        async for _ in engine.submit([1, 2, 3], SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(EngineStopped):
        asyncio.run(asyncio.wait_for(one_request(), timeout=30))  # an error, never a hung request
    assert len(rebuilds) == 3 and core.steps == 4, "three rebuilds, then the fourth failure is final"
    assert not engine.alive and isinstance(engine.error, TransportError)

    # the Serve replica's health check then fails, so that Serve replaces the replica
    replica = object.__new__(EngineDeployment.func_or_class)
    replica.engine = engine
    replica.host = types.SimpleNamespace(experts_alive=lambda: True, shutdown=lambda: None)
    with pytest.raises(RuntimeError, match="engine loop stopped"):
        asyncio.run(replica.check_health())
    assert not replica.ready()


# ------------------------------------------------------------------------------- stalled collective (Engine)

STALL_TIMEOUT_S = 3.0
STALL_PROMPTS = ["The harbour town", "A computer program", "The weather today", "When you cook rice"]
STALL_TOKENS = 120
PROBE_PROMPT, PROBE_TOKENS = "Large language models", 2


def test_stalled_collective_is_detected_within_the_timeout_and_recovered(ray_cluster, demo_model):
    """SIGSTOP on an expert actor: a real peer that stops answering inside its loop."""
    stopped: int | None = None
    with Engine(
        demo_model,
        expert_shards=2,
        router_cpus=0.5,
        expert_cpus=0.5,
        max_model_len=MAX_MODEL_LEN,
        collective_timeout_s=STALL_TIMEOUT_S,
    ) as engine:
        try:
            expected = engine.generate(STALL_PROMPTS, max_new_tokens=STALL_TOKENS, ignore_eos=True)
            [probe_expected] = engine.generate(PROBE_PROMPT, max_new_tokens=PROBE_TOKENS, ignore_eos=True)
            # idle for longer than the timeout is not a stall: the group is still there afterwards (the
            # idle time is what is tested here, not a wait for something; a poll would wake the loop)
            time.sleep(STALL_TIMEOUT_S + 2)
            short = engine.generate(STALL_PROMPTS, max_new_tokens=8, ignore_eos=True)
            assert [c.token_ids for c in short] == [c.token_ids[:8] for c in expected]
            assert engine.stats()["recoveries_s"] == [], "an idle engine re-formed its group"

            info = engine.info()
            pg_id = actor_by_pid("RouterActor", info["pid"]).placement_group_id
            before = experts_in(pg_id)
            assert sorted(before) == [1, 2]
            info = {e["shard"]: e["pid"] for e in info["experts"]}
            assert {1 + s: p for s, p in info.items()} == before

            result: dict = {}
            probes: list[tuple[float, str | None]] = []
            finished = threading.Event()

            def long_run() -> None:
                try:
                    result["out"] = engine.generate(
                        STALL_PROMPTS, max_new_tokens=STALL_TOKENS, ignore_eos=True
                    )
                except BaseException as err:
                    result["error"] = err
                finally:
                    finished.set()

            def probe_loop() -> None:
                # short requests beside the long one: the first to finish after the stall dates the recovery
                try:
                    while not finished.is_set():
                        [c] = engine.generate(PROBE_PROMPT, max_new_tokens=PROBE_TOKENS, ignore_eos=True)
                        probes.append((time.monotonic(), c.text))
                except BaseException as err:
                    result["probe_error"] = err

            runner = threading.Thread(target=long_run, daemon=True)
            runner.start()
            assert wait_for(
                lambda: engine.stats()["steps"] >= 20 or finished.is_set(), 60, tolerate=MEANWHILE
            )
            assert not finished.is_set(), "precondition: the long request is still running"
            stopped = before[1]
            stopped_at = time.monotonic()
            os.kill(stopped, signal.SIGSTOP)
            prober = threading.Thread(target=probe_loop, daemon=True)
            prober.start()
            runner.join(timeout=300)
            assert not runner.is_alive(), "the request hung on a stalled collective"
            prober.join(timeout=120)
            assert "error" not in result and "probe_error" not in result, result
            assert probes, "no request completed after the stall"

            assert [c.token_ids for c in result["out"]] == [c.token_ids for c in expected]
            assert [c.text for c in result["out"]] == [c.text for c in expected]
            assert all(text == probe_expected.text for _, text in probes), probes

            after_stats = engine.stats()
            assert len(after_stats["recoveries_s"]) == 1, after_stats
            assert after_stats["expert_restarts"] == 1, after_stats
            [recovery] = after_stats["recoveries_s"]
            # the stalled peer was replaced in its own bundle; the other one, which only lost its group, kept
            assert wait_for(lambda: sorted(experts_in(pg_id)) == [1, 2], 60, tolerate=MEANWHILE), experts_in(
                pg_id
            )
            after = experts_in(pg_id)
            assert after[2] == before[2] and after[1] != before[1], (before, after)
            assert wait_for(lambda: pid_gone(stopped), 30, tolerate=MEANWHILE), (
                "the stalled process was left running"
            )

            first_probe = min(t for t, _ in probes)
            # upper bound on detection: stall -> first request done after it, minus the recovery itself
            detection = first_probe - stopped_at - recovery
            record(
                "stalled_collective",
                {
                    "collective_timeout_s": STALL_TIMEOUT_S,
                    "detection_s_at_most": round(detection, 2),
                    "recovery_s": round(recovery, 2),
                    "stall_to_next_token_s": round(first_probe - stopped_at, 2),
                },
            )
            assert detection <= STALL_TIMEOUT_S + 4.0, f"stall detected after {detection:.1f} s"
            assert recovery < 60.0, f"recovery took {recovery:.1f} s"
        finally:
            if stopped is not None:
                kill(stopped, signal.SIGCONT)
                kill(stopped)
