"""Serve autoscaling of whole model instances: 1 -> 2 engine replicas under load, and back to 1 after it.

Each engine replica is a router with its own expert actor in its own placement group, so the number of alive
ExpertActor actors in the app's replica placement groups must follow the replica count.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
import ray
from ray import serve
from ray.serve._private.common import ReplicaState
from ray.util.state import list_actors

from tests.conftest import deploy_app
from tests.toolkit import wait_for

APP = "scale"
ENGINE = "MoEEngine"
CLIENTS = 8
MAX_TOKENS = 150
SCALE_TIMEOUT_S = 120


@dataclass
class Load:
    """CLIENTS threads, each streaming completions one after another until stopped."""

    url: str
    model: str
    stop: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=120) as client:
            n = 0
            while not self.stop.is_set():
                body = {
                    "model": self.model,
                    "prompt": f"client {index} request {n}: the quick brown fox",
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "stream": True,
                }
                n += 1
                try:
                    with client.stream("POST", f"{self.url}/v1/completions", json=body) as reply:
                        if reply.status_code != 200:
                            reply.read()
                            raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:200]}")
                        for line in reply.iter_lines():
                            if self.stop.is_set():
                                break  # leaving the stream aborts the sequence in the engine
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"]["message"])
                            with self.lock:
                                self.tokens += len(chunk["choices"])
                    with self.lock:
                        self.requests += 1
                except Exception as err:
                    with self.lock:
                        self.errors.append(f"client {index}: {type(err).__name__}: {err}")
                    self.stop.wait(0.5)  # back off after an error, unless told to stop

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def running_replicas() -> int:
    status = serve.status().applications[APP].deployments[ENGINE]
    return status.replica_states.get(ReplicaState.RUNNING, 0)


def expert_actors_of_app() -> tuple[int, int]:
    """(engine replica actors alive, ExpertActors alive in those replicas' placement groups)."""
    # The session cluster's address, explicitly: with none, the state API refuses to guess whenever another
    # Ray instance runs on this machine (e.g. a `moe-cluster serve` under test).
    address = ray.get_runtime_context().gcs_address
    alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
    replicas = [a for a in alive if a.class_name == f"ServeReplica:{APP}:{ENGINE}"]
    groups = {a.placement_group_id for a in replicas}
    experts = [a for a in alive if a.class_name == "ExpertActor" and a.placement_group_id in groups]
    return len(replicas), len(experts)


def settle(condition: Callable[[], bool], timeout: float, what: str, timeline: list) -> float:
    """Seconds until `condition` held, recording (t, running replicas) on the way; fails after `timeout`."""
    start = time.monotonic()

    def polled() -> bool:
        timeline.append((round(time.monotonic() - start, 1), running_replicas()))
        return condition()

    if not wait_for(polled, timeout, interval=0.5):
        pytest.fail(f"{what} not reached within {timeout} s; (t, running replicas): {timeline[-40:]}")
    return time.monotonic() - start


def test_engine_scales_out_under_load_and_back_in(serve_http, demo_model):
    options = {
        "model": str(demo_model),
        "expert_shards": 1,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": 256,
        "engine_autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 2,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    }
    url = serve_http + deploy_app(APP, options)
    load = Load(url, demo_model.name)
    try:
        assert running_replicas() == 1
        assert expert_actors_of_app() == (1, 1)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200

        load.start()
        timeline: list = []
        up_after = settle(lambda: running_replicas() == 2, SCALE_TIMEOUT_S, "2 RUNNING replicas", timeline)
        # A whole second model instance: a second router replica with its own expert actor.
        assert expert_actors_of_app() == (2, 2)
        with load.lock:
            at_scale_out = load.tokens
        # both instances serve while the load lasts
        assert wait_for(lambda: load.tokens > at_scale_out, 60), load.errors[:5]
        with load.lock:
            tokens_under_load = load.tokens
        assert running_replicas() == 2
        load.finish()
        assert all(not t.is_alive() for t in load.threads), "a load client did not stop"
        assert tokens_under_load > 0, load.errors[:5]
        assert not load.errors, load.errors[:5]

        timeline = []
        down_after = settle(
            lambda: running_replicas() == 1 and expert_actors_of_app() == (1, 1),
            SCALE_TIMEOUT_S,
            "back to 1 replica with 1 expert actor",
            timeline,
        )
        print(
            f"scaled up after {up_after:.1f} s of load, down after {down_after:.1f} s without;"
            f" {load.requests} requests, {load.tokens} tokens streamed"
        )
        # The remaining instance still serves.
        body = {"model": demo_model.name, "prompt": "after", "max_tokens": 4, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
    finally:
        load.finish()
        serve.delete(APP)
    assert APP not in serve.status().applications
    wait_for(lambda: expert_actors_of_app() == (0, 0), 30, interval=0.5)
    assert expert_actors_of_app() == (0, 0), "actors of the deleted app are still alive"
