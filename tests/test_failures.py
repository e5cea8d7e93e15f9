"""Failures on a real local cluster, under load: expert actors killed or stalled, the engine replica killed.

The Serve app "chaos" (one engine replica, two expert shards) serves 64 greedy streaming requests, 8 at a
time, once without faults (the reference) and once while its expert actors are SIGKILLed twice and the
engine replica once: every stream must equal the reference chunk for chunk. A stalled collective is
made real with SIGSTOP on an expert process and checked through the Engine API, whose collective timeout
can be set. Recovery durations go to RESULTS_PATH (and to stdout under `pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import threading
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from cluster.engine import Engine
from cluster.errors import EngineStopped
from cluster.instance.engine_loop import EngineLoop
from cluster.serve.deployment import EngineDeployment
from router.errors import TransportError
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from tests.conftest import deploy_app

pytestmark = pytest.mark.slow

APP = "chaos"
MAX_MODEL_LEN = 256
OPTIONS = {
    "expert_shards": 2,
    "router_cpus": 0.5,
    "expert_cpus": 0.5,
    "max_model_len": MAX_MODEL_LEN,
    "max_num_seqs": 16,
    "max_waiting": 64,
}
REQUESTS, CONCURRENCY, MAX_TOKENS = 64, 8, 40
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=30.0)  # a stream may pause while a replica is rebuilt
RESULTS_PATH = Path("/tmp/moe_cluster_recovery.json")

SUBJECTS = [
    "The harbour town",
    "A computer program",
    "Large language models",
    "When you cook rice",
    "The weather today",
    "Question: What is",
    "The market opened",
    "Children ran between",
]
LINKS = ["and", "was", "in the", "of", "for a", "on the", "is", "with"]
PROMPTS = [f"{s} {w}" for s in SUBJECTS for w in LINKS]
assert len(set(PROMPTS)) == REQUESTS


# ---------------------------------------------------------------------------------------------- helpers


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # a replica being replaced answers with errors meanwhile
            if predicate():
                return True
        time.sleep(interval)
    return predicate()


def record(key: str, value: object) -> None:
    """Merges one test's measurements into RESULTS_PATH and prints them."""
    data = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    data[key] = value
    RESULTS_PATH.write_text(json.dumps(data, indent=2))
    print(f"\n[recovery] {key}: {json.dumps(value)}")


@dataclass
class Stream:
    """One streamed completion as the client saw it: a chunk (text delta, arrival time) per token."""

    prompt: str
    status: int = 0
    chunks: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    errors: list[str] = field(default_factory=list)
    done: bool = False
    started: float = 0.0

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def check(self) -> None:
        """A complete, well-formed stream: 200, no error event, one finish on the last chunk, [DONE]."""
        assert self.status == 200, (self.prompt, self.status, self.errors)
        assert not self.errors, (self.prompt, self.errors)
        assert self.done, f"{self.prompt!r}: no [DONE]"
        assert self.finish_reason in ("stop", "length"), (self.prompt, self.finish_reason)
        assert self.completion_tokens == len(self.chunks), (self.prompt, self.completion_tokens)


def stream_completion(http: httpx.Client, model: str, prompt: str, max_tokens: int) -> Stream:
    out = Stream(prompt, started=time.monotonic())
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with http.stream("POST", "/v1/completions", json=body) as response:
            out.status = response.status_code
            if response.status_code != 200:
                out.errors.append(response.read().decode(errors="replace"))
                return out
            for line in response.iter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    out.errors.append(f"not an SSE data line: {line!r}")
                    continue
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    out.done = True
                    continue
                if out.done:
                    out.errors.append(f"event after [DONE]: {payload}")
                chunk = json.loads(payload)
                if "error" in chunk:
                    out.errors.append(payload)
                    continue
                if chunk.get("usage"):
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if out.finish_reason is not None:
                        out.errors.append(f"a chunk after the finishing one: {payload}")
                    out.chunks.append(choice["text"])
                    out.times.append(time.monotonic())
                    out.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as err:
        out.errors.append(f"{type(err).__name__}: {err}")
    return out


class Progress:
    """Completed requests, for a chaos schedule that acts at points of the run."""

    def __init__(self) -> None:
        self._done = 0
        self._cond = threading.Condition()

    def completed(self) -> None:
        with self._cond:
            self._done += 1
            self._cond.notify_all()

    def wait(self, count: int, timeout: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done >= count, timeout):
                raise TimeoutError(f"only {self._done} of {count} requests completed in {timeout} s")


def run_workload(
    url: str,
    model: str,
    progress: Progress | None = None,
    prompts: list[str] = PROMPTS,
    concurrency: int = CONCURRENCY,
    max_tokens: int = MAX_TOKENS,
) -> list[Stream]:
    """One greedy stream per prompt, `concurrency` at a time; results in prompt order."""
    limits = httpx.Limits(max_connections=concurrency * 2)
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT, limits=limits) as http:

        def one(prompt: str) -> Stream:
            result = stream_completion(http, model, prompt, max_tokens)
            if progress:
                progress.completed()
            return result

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, prompts))


def gcs() -> str:
    return ray.get_runtime_context().gcs_address


def bundle_of(actor) -> int:
    """The placement-group bundle an actor was scheduled into (from its `CPU_group_<i>_<pg>` resource)."""
    indices = {int(m.group(1)) for r in actor.required_resources if (m := re.match(r"CPU_group_(\d+)_", r))}
    assert len(indices) == 1, actor.required_resources
    return indices.pop()


def replica_actor(app: str):
    from ray.util.state import list_actors

    filters = [("class_name", "=", f"ServeReplica:{app}:MoEEngine"), ("state", "=", "ALIVE")]
    replicas = list_actors(address=gcs(), filters=filters, detail=True)
    assert len(replicas) == 1, replicas
    return replicas[0]


def actor_by_pid(class_name: str, pid: int):
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    [actor] = [a for a in list_actors(address=gcs(), filters=filters, detail=True) if a.pid == pid]
    return actor


def experts_in(pg_id: str) -> dict[int, int]:
    """Bundle index -> pid of the ALIVE expert actors in a placement group."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "ExpertActor"), ("state", "=", "ALIVE")]
    actors = [
        a for a in list_actors(address=gcs(), filters=filters, detail=True) if a.placement_group_id == pg_id
    ]
    bundles = {bundle_of(a): a.pid for a in actors}
    assert len(bundles) == len(actors), "two live expert actors in one bundle"
    return bundles


def stats(app: str = APP) -> dict:
    handle = serve.get_deployment_handle("MoEEngine", app_name=app)
    return handle.recovery_stats.remote().result(timeout_s=60)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie has exited
    except FileNotFoundError:
        return True


def rounded(value: object) -> object:
    return round(value, 2) if isinstance(value, float) else value


def stall_after(streams: list[Stream], at: float, window: float = 120.0) -> tuple[float, float]:
    """Client-visible pause after a fault at `at`: (longest wait from `at` to a stream's next token,
    longest wait between two tokens of a stream, or its start and first token, ending within `window`).
    """
    waits, gaps = [0.0], [0.0]
    for s in streams:
        times = [s.started, *s.times]
        for earlier, later in itertools.pairwise(times):
            if at < later <= at + window:
                gaps.append(later - max(earlier, at))
        after = [t for t in s.times if t > at]
        if s.started <= at and after:
            waits.append(after[0] - at)
    return max(waits), max(gaps)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chaos_url(serve_http, demo_model) -> Iterator[str]:
    deploy_app(APP, {"model": str(demo_model), **OPTIONS})
    try:
        yield f"{serve_http}/{APP}"
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def model_name(chaos_url) -> str:
    return httpx.get(f"{chaos_url}/v1/models", timeout=60).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference(chaos_url, model_name) -> list[Stream]:
    """The fault-free run: what every later run of the same requests must reproduce exactly."""
    streams = run_workload(chaos_url, model_name)
    for s in streams:
        s.check()
    assert sum(len(s.chunks) for s in streams) > REQUESTS * MAX_TOKENS // 2, "precondition: long outputs"
    return streams


def assert_same_as_reference(streams: list[Stream], reference: list[Stream]) -> None:
    for got, ref in zip(streams, reference, strict=True):
        got.check()
        assert got.prompt == ref.prompt
        # chunk for chunk: no token missing or sent twice, and the text of an uninterrupted greedy run
        assert got.chunks == ref.chunks, (got.prompt, got.chunks, ref.chunks)
        assert got.finish_reason == ref.finish_reason, got.prompt
        assert got.completion_tokens == ref.completion_tokens, got.prompt


# ---------------------------------------------------------------------------------------- bounded retries


class _FailingCore:
    """An EngineCore whose every step fails in the transport, as a group broken beyond repair would."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_waiting=8), cache=None)
        self.experts = types.SimpleNamespace(heartbeat=lambda: None)  # an idle loop's heartbeat
        self.requests: list[str] = []
        self.steps = 0

    def validate(self, prompt_ids, params) -> None:
        pass

    def add_request(self, prompt_ids, params, request_id=None) -> str:
        self.requests.append(request_id)
        return request_id

    def abort(self, request_id) -> None:
        pass

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self):
        self.steps += 1
        raise TransportError("gloo all_to_all failed: connection reset")


def test_retries_are_bounded_then_the_replica_reports_unhealthy():
    core, rebuilds = _FailingCore(), []
    engine = EngineLoop(core, recover=lambda: rebuilds.append(time.monotonic()), max_recoveries=3)

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
            # idle for longer than the timeout is not a stall: the group is still there afterwards
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
            assert wait_for(lambda: engine.stats()["steps"] >= 20 or finished.is_set(), 60)
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
            assert wait_for(lambda: sorted(experts_in(pg_id)) == [1, 2], 60), experts_in(pg_id)
            after = experts_in(pg_id)
            assert after[2] == before[2] and after[1] != before[1], (before, after)
            assert wait_for(lambda: pid_gone(stopped), 30), "the stalled process was left running"

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


# ------------------------------------------------------------------------------------------- chaos (Serve)


@pytest.mark.timeout(1200)
def test_chaos_expert_and_replica_kills_under_load(chaos_url, model_name, reference):
    """Two expert SIGKILLs and an engine-replica SIGKILL amid 64 greedy streams: nothing lost or doubled."""
    assert stats()["expert_restarts"] == 0, "precondition: a fresh replica"
    progress = Progress()
    events: list[dict] = []
    chaos_error: list[BaseException] = []
    snapshot: dict = {}

    def kill_expert(bundle: int, restarts: int) -> None:
        replica = replica_actor(APP)
        experts = experts_in(replica.placement_group_id)
        assert sorted(experts) == [1, 2], experts
        pid = experts[bundle]
        kill(pid)
        at = time.monotonic()
        assert wait_for(lambda: stats()["expert_restarts"] >= restarts, 180), "no expert restart"

        # replaced in the same bundle of the same placement group, by a new process
        def replaced() -> bool:
            now = experts_in(replica.placement_group_id)
            return sorted(now) == [1, 2] and now[bundle] != pid

        assert wait_for(replaced, 120), (experts, experts_in(replica.placement_group_id))
        # the step the loss interrupted failed once and was run again on the re-formed group
        assert wait_for(lambda: len(stats()["recoveries_s"]) >= restarts, 180), stats()
        assert replica_actor(APP).pid == replica.pid, "the replica itself was replaced, not repaired"
        recovery = stats()["recoveries_s"][restarts - 1]
        events.append(
            {"kind": "expert", "bundle": bundle, "pid": pid, "at": at, "server_recovery_s": recovery}
        )

    def chaos() -> None:
        try:
            progress.wait(6, 600)
            kill_expert(1, restarts=1)
            progress.wait(20, 600)
            kill_expert(2, restarts=2)
            snapshot.update(stats())
            progress.wait(34, 600)
            replica = replica_actor(APP)
            kill(replica.pid)
            events.append({"kind": "replica", "pid": replica.pid, "at": time.monotonic()})
        except BaseException as err:
            chaos_error.append(err)

    chaos_thread = threading.Thread(target=chaos, daemon=True)
    chaos_thread.start()
    streams = run_workload(chaos_url, model_name, progress)
    chaos_thread.join(timeout=60)
    assert not chaos_error, chaos_error
    assert [e["kind"] for e in events] == ["expert", "expert", "replica"]

    assert_same_as_reference(streams, reference)

    # the two expert losses were repaired in place: two restarts, two recoveries, a new group generation
    assert snapshot["expert_restarts"] == 2, snapshot
    assert len(snapshot["recoveries_s"]) == 2, snapshot
    assert snapshot["generation"] == 2, snapshot
    # the engine replica was replaced and serves
    new_replica = replica_actor(APP)
    assert new_replica.pid != events[2]["pid"]
    assert stats()["expert_restarts"] == 0

    measured = []
    for e, after in zip(events, [*events[1:], None], strict=True):
        window = after["at"] - e["at"] if after else 120.0  # up to the next fault
        wait, gap = stall_after(streams, e["at"], window)
        measured.append(
            {**{k: v for k, v in e.items() if k != "at"}, "to_next_token_s": wait, "longest_pause_s": gap}
        )
        assert wait > 0, f"no stream was running across the {e['kind']} kill"
    record(
        "chaos",
        {
            "server_recoveries_s": [round(r, 2) for r in snapshot["recoveries_s"]],
            "faults": [{k: rounded(v) for k, v in m.items()} for m in measured],
            "requests": len(streams),
            "tokens": sum(len(s.chunks) for s in streams),
        },
    )


# ---------------------------------------------------------------------------------------- health, idle


def test_idle_expert_loss_is_repaired_and_health_reflects_it(chaos_url, model_name, reference):
    with httpx.Client(base_url=chaos_url, timeout=HTTP_TIMEOUT) as http:
        assert wait_for(lambda: http.get("/health").status_code == 200, 120)
        assert http.get("/health").json() == {"status": "ok"}
        before = stats()
        replica = replica_actor(APP)
        experts = experts_in(replica.placement_group_id)
        kill(experts[1])
        killed_at = time.monotonic()

        # repaired in place with no request needed (check_health, or the idle heartbeat), /health 200 again
        def repaired() -> bool:
            return (
                stats()["expert_restarts"] == before["expert_restarts"] + 1
                and http.get("/health").status_code == 200
            )

        assert wait_for(repaired, 120), (stats(), http.get("/health").text)
        repaired_in = time.monotonic() - killed_at
        after = stats()
        assert after["generation"] == before["generation"] + 1
        assert replica_actor(APP).pid == replica.pid, "repaired in place, not replaced"
        # the lost shard is a new process in its bundle; the other one, which only lost its group, stays
        assert wait_for(lambda: sorted(experts_in(replica.placement_group_id)) == [1, 2], 60)
        now = experts_in(replica.placement_group_id)
        assert now[1] != experts[1] and now[2] == experts[2], (experts, now)

        again = stream_completion(http, model_name, PROMPTS[0], MAX_TOKENS)
        again.check()
        assert again.chunks == reference[0].chunks
    record("idle_expert_loss", {"health_ok_again_after_s": round(repaired_in, 2)})


# -------------------------------------------------------------------------------------------------- drain


@pytest.mark.timeout(900)
def test_upgrade_drains_running_streams(chaos_url, model_name, reference, demo_model):
    """serve.run with changed options while streams run: every stream completes, equal to the reference."""
    old_replica = replica_actor(APP)
    upgraded = threading.Event()
    streams: list[Stream] = []
    lock = threading.Lock()

    def client(worker: int) -> None:
        # keeps requests running until the upgrade is over, then one more: some span the hand-over
        with httpx.Client(base_url=chaos_url, timeout=HTTP_TIMEOUT) as http:
            i, extra = worker, 1
            while extra >= 0:
                if upgraded.is_set():
                    extra -= 1
                s = stream_completion(http, model_name, PROMPTS[i % REQUESTS], MAX_TOKENS)
                with lock:
                    streams.append(s)
                i += CONCURRENCY

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(CONCURRENCY)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(streams) >= CONCURRENCY, 300)
        started = time.monotonic()
        deploy_app(APP, {"model": str(demo_model), **OPTIONS, "max_waiting": OPTIONS["max_waiting"] + 1})
        upgraded_at = time.monotonic()
    finally:
        upgraded.set()
        for t in threads:
            t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a stream hung across the upgrade"

    new_replica = replica_actor(APP)
    assert new_replica.pid != old_replica.pid, "the upgrade did not replace the engine replica"
    assert wait_for(lambda: pid_gone(old_replica.pid), 120), "the old replica did not exit"
    by_prompt = {r.prompt: r for r in reference}
    for s in streams:
        s.check()
        assert s.chunks == by_prompt[s.prompt].chunks, s.prompt
    # some of them were running while the old replica was asked to stop
    spanning = [s for s in streams if s.started < upgraded_at < s.times[-1]]
    assert spanning, "no stream ran across the hand-over"
    record(
        "upgrade",
        {
            "streams": len(streams),
            "spanning_handover": len(spanning),
            "upgrade_s": round(upgraded_at - started, 2),
        },
    )
