"""Failures on a real local cluster, under load: expert actors and the engine replica killed.

The Serve app "chaos" (one engine replica, two expert shards) serves 64 greedy streaming requests, 8 at a
time, once without faults (the reference) and once while its expert actors are SIGKILLed twice and the
engine replica once: every stream must equal the reference chunk for chunk. An idle expert loss is
repaired with no request needed, and an upgrade drains the running streams. Recovery durations go to
RESULTS_PATH (and to stdout under `pytest -s`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from tests.conftest import deploy_app, served_app, served_model
from tests.toolkit import (
    Progress,
    Stream,
    experts_in,
    kill,
    pid_gone,
    record_result,
    replica_actor,
    run_streams,
    stall_after,
    stream_completion,
    wait_for,
)

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
MEANWHILE = (Exception,)  # what wait_for tolerates: a group or replica being rebuilt answers with errors
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


def record(key: str, value: object) -> None:
    record_result(RESULTS_PATH, key, value)


def run_workload(url: str, model: str, progress: Progress | None = None) -> list[Stream]:
    """REQUESTS greedy streams, CONCURRENCY at a time; results in PROMPTS order."""
    requests = [(p, {}) for p in PROMPTS]
    return run_streams(url, model, requests, CONCURRENCY, MAX_TOKENS, progress, HTTP_TIMEOUT)


def stats(app: str = APP) -> dict:
    handle = serve.get_deployment_handle("MoEEngine", app_name=app)
    return handle.recovery_stats.remote().result(timeout_s=60)


def rounded(value: object) -> object:
    return round(value, 2) if isinstance(value, float) else value


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chaos_url(serve_http, demo_model) -> Iterator[str]:
    with served_app(serve_http, APP, {"model": str(demo_model), **OPTIONS}) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(chaos_url) -> str:
    return served_model(chaos_url)


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
        assert wait_for(lambda: stats()["expert_restarts"] >= restarts, 180, tolerate=MEANWHILE), (
            "no expert restart"
        )

        # replaced in the same bundle of the same placement group, by a new process
        def replaced() -> bool:
            now = experts_in(replica.placement_group_id)
            return sorted(now) == [1, 2] and now[bundle] != pid

        assert wait_for(replaced, 120, tolerate=MEANWHILE), (
            experts,
            experts_in(replica.placement_group_id),
        )
        # the step the loss interrupted failed once and was run again on the re-formed group
        assert wait_for(lambda: len(stats()["recoveries_s"]) >= restarts, 180, tolerate=MEANWHILE), stats()
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
        assert wait_for(lambda: http.get("/health").status_code == 200, 120, tolerate=MEANWHILE)
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

        assert wait_for(repaired, 120, tolerate=MEANWHILE), (stats(), http.get("/health").text)
        repaired_in = time.monotonic() - killed_at
        after = stats()
        assert after["generation"] == before["generation"] + 1
        assert replica_actor(APP).pid == replica.pid, "repaired in place, not replaced"
        # the lost shard is a new process in its bundle; the other one, which only lost its group, stays
        assert wait_for(
            lambda: sorted(experts_in(replica.placement_group_id)) == [1, 2], 60, tolerate=MEANWHILE
        )
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
        assert wait_for(lambda: len(streams) >= CONCURRENCY, 300, tolerate=MEANWHILE)
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
    assert wait_for(lambda: pid_gone(old_replica.pid), 120, tolerate=MEANWHILE), (
        "the old replica did not exit"
    )
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
