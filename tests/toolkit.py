"""What the tests (and benchmarks/) share: small configs, an in-process engine core, one wait helper,
one client for the streaming API, a stand-in core for EngineLoop, the vendored data the tests read.

No fixtures here (they live in tests/conftest.py); plain functions and classes, importable from a
benchmark as `from tests.toolkit import local_core`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
import torch

from experts.checkpoint import CheckpointReader
from experts.placement import ModelPlacement
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.engine_core import EngineCore, TokenEvent, default_cache_bytes
from router.exchange import LocalExperts
from router.kv_cache import KVCache
from router.sampling import SamplingParams
from router.scheduler import Scheduler, SchedulerConfig
from router.weights import expert_kind, load_router_model

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------ configs

TINY_CONFIG: dict = {
    "architectures": ["AfmoeForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_dense_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "sliding_window": 4,
    "global_attn_every_n_layers": 2,
}


def tiny_config(**overrides: object) -> dict:
    """A small AFMoE config dict (for AfmoeConfig, ModelConfig.from_dict or write_afmoe_checkpoint)."""
    return {**TINY_CONFIG, **overrides}


# -------------------------------------------------------------------------------- in-process core


def local_core(
    model_dir: Path,
    shards: int = 2,
    max_num_seqs: int = 8,
    max_model_len: int = 128,
    max_num_batched_tokens: int = 64,
    max_waiting: int = 16,
    dtype: torch.dtype = torch.float32,
    profile: bool = True,
) -> EngineCore:
    """The router's EngineCore over LocalExperts: every expert shard in this process, no Ray.

    `profile` also times attention and gates and counts tokens per expert (what metrics read).
    """
    config = ModelConfig.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    cpu = torch.device("cpu")
    placement = ModelPlacement.uniform(len(config.moe_layers), config.num_experts, shards)
    experts = LocalExperts(
        [
            ExpertShard.load(reader, config.moe_layers, placement.slots_of(s), dtype, expert_kind(config))
            for s in range(shards)
        ],
        placement,
    )
    cache_bytes = default_cache_bytes(config, max_num_seqs, max_model_len, 16, dtype)
    cache = KVCache(config, cache_bytes, max_num_seqs, 16, dtype, cpu)
    model = load_router_model(reader, config, dtype, cpu)
    scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, max_waiting)
    return EngineCore(config, model, cache, experts, scheduler, profile=profile)


class StubCore:
    """A stand-in for EngineCore that implements EngineLoop's LoopCore over a real Scheduler.

    It accepts everything and never produces a token; subclasses change the one behaviour a test is about.
    """

    def __init__(self, max_num_seqs: int = 4, max_waiting: int = 8) -> None:
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_waiting=max_waiting), None)
        self.experts = types.SimpleNamespace(heartbeat=lambda: None)  # an idle loop's heartbeat
        self.requests: list[str] = []

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        pass

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        self.requests.append(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        pass

    def has_work(self) -> bool:
        return False

    def step(self) -> list[TokenEvent]:
        return []


# ------------------------------------------------------------------------------------------ metrics


def scrape(metrics_port: int, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric `name` (as Ray exports it, `ray_` prefixed, a counter
    with its `_total`) that the Ray node's metrics export port serves with these `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in (f"ray_{name}", f"ray_{name}_total")
        and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


# -------------------------------------------------------------------------------------------- waiting


def wait_for(
    condition: Callable[[], object],
    timeout: float,
    interval: float = 0.1,
    tolerate: tuple[type[BaseException], ...] = (),
) -> bool:
    """Polls `condition` until it is true or `timeout` seconds have passed; whether it became true.

    Exceptions of the `tolerate` types count as "not yet" (a replica being replaced answers with errors
    meanwhile); any other exception propagates at once. The condition gets one last try at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        try:
            if condition():
                return True
        except tolerate:
            pass
        if last_try:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# ------------------------------------------------------------------------------------ streaming client


@dataclass
class Stream:
    """One streamed completion as the client saw it: a chunk (text delta, arrival time) per choice event."""

    prompt: str
    status: int = 0
    chunks: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    errors: list[str] = field(default_factory=list)
    done: bool = False
    started: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict | None = None  # the JSON body of a refused request

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def complete(self) -> bool:
        return (
            self.status == 200
            and self.done
            and not self.errors
            and self.finish_reason in ("stop", "length")
            and self.completion_tokens == len(self.chunks)
        )

    def check(self) -> None:
        """A complete, well-formed stream: 200, no error event, one finish on the last chunk, [DONE]."""
        assert self.status == 200, (self.prompt, self.status, self.errors)
        assert not self.errors, (self.prompt, self.errors)
        assert self.done, f"{self.prompt!r}: no [DONE]"
        assert self.finish_reason in ("stop", "length"), (self.prompt, self.finish_reason)
        assert self.completion_tokens == len(self.chunks), (self.prompt, self.completion_tokens)

    def start(self, response: httpx.Response) -> None:
        self.status, self.headers = response.status_code, dict(response.headers)

    def refused(self, raw: bytes) -> None:
        self.errors.append(raw.decode(errors="replace"))
        with contextlib.suppress(ValueError):
            self.body = json.loads(raw)

    def feed(self, line: str) -> None:
        """One line of the server-sent-event stream."""
        if not line:
            return
        if not line.startswith("data: "):
            self.errors.append(f"not an SSE data line: {line!r}")
            return
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            self.done = True
            return
        if self.done:
            self.errors.append(f"event after [DONE]: {payload}")
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            self.errors.append(payload)
            return
        if chunk.get("usage"):
            self.completion_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            if self.finish_reason is not None:
                self.errors.append(f"a chunk after the finishing one: {payload}")
            self.chunks.append(choice["text"])
            self.times.append(time.monotonic())
            self.finish_reason = choice["finish_reason"]


def completion_request(model: str, prompt: str, max_tokens: int, **sampling: object) -> dict:
    """A streamed /v1/completions body that asks for the usage chunk; greedy unless `sampling` says
    otherwise (e.g. temperature=0.8, seed=7)."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }


def stream_completion(
    http: httpx.Client, model: str, prompt: str, max_tokens: int, **sampling: object
) -> Stream:
    out = Stream(prompt, started=time.monotonic())
    body = completion_request(model, prompt, max_tokens, **sampling)
    try:
        with http.stream("POST", "/v1/completions", json=body) as r:
            out.start(r)
            if r.status_code != 200:
                out.refused(r.read())
                return out
            for line in r.iter_lines():
                out.feed(line)
    except httpx.HTTPError as err:
        out.errors.append(f"{type(err).__name__}: {err}")
    return out


STREAM_TIMEOUT = httpx.Timeout(300.0, connect=30.0)  # a stream may pause while a group is rebuilt


class Progress:
    """Completed requests, for a fault schedule that acts at points of a run."""

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


def run_streams(
    url: str,
    model: str,
    requests: list[tuple[str, dict]],
    concurrency: int,
    max_tokens: int,
    progress: Progress | None = None,
    timeout: httpx.Timeout = STREAM_TIMEOUT,
) -> list[Stream]:
    """(prompt, sampling) streamed completions, `concurrency` at a time; results in request order."""
    limits = httpx.Limits(max_connections=concurrency * 2)
    with httpx.Client(base_url=url, timeout=timeout, limits=limits) as http:

        def one(request: tuple[str, dict]) -> Stream:
            prompt, sampling = request
            result = stream_completion(http, model, prompt, max_tokens, **sampling)
            if progress:
                progress.completed()
            return result

        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(one, requests))


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


async def astream_completion(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Stream:
    """stream_completion on an AsyncClient."""
    out = Stream(prompt, started=time.monotonic())
    body = completion_request(model, prompt, max_tokens)
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            out.start(r)
            if r.status_code != 200:
                out.refused(await r.aread())
                return out
            async for line in r.aiter_lines():
                out.feed(line)
    except httpx.HTTPError as err:
        out.errors.append(f"{type(err).__name__}: {err}")
    return out


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-event stream, in order; asserts the framing."""
    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        events.append(line[len("data: ") :])
    return events


def openai_error(response: httpx.Response, status: int) -> dict:
    """Asserts an OpenAI-style error response with this status; returns its "error" object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    return error_object(response.json())


def error_object(body: dict) -> dict:
    """Asserts the shape of an OpenAI error body; returns its "error" object."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return error


# ---------------------------------------------------------------------------------- Ray's actors, results


def checkout_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`moe-cluster ARGS` from this checkout in a fresh interpreter (env: extra variables)."""
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
        check=False,
    )


def send_json(handler: BaseHTTPRequestHandler, status: int, body: object) -> None:
    """Answers a test HTTP server's request with a JSON body."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def bundle_of(actor) -> int:
    """The placement-group bundle an actor was scheduled into (from its `CPU_group_<i>_<pg>` resource)."""
    indices = {int(m.group(1)) for r in actor.required_resources if (m := re.match(r"CPU_group_(\d+)_", r))}
    assert len(indices) == 1, actor.required_resources
    return indices.pop()


def record_result(path: Path, key: str, value: object) -> None:
    """Merges one test's measurements into the JSON file at `path` and prints them (`pytest -s`)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    path.write_text(json.dumps(data, indent=2))
    print(f"\n[{path.stem}] {key}: {json.dumps(value)}")


# --------------------------------------------------------------------------------------- vendored data

VENDOR_DATA = Path(os.environ.get("MOE_VENDOR_DATA", REPO.parent / "shared" / "vendor-data"))


def vendor_data(relative: str) -> Path:
    """A file or folder of third-party reference data (CRDs, Ray's schemas and dashboards).

    It is not in this repository (it is others' text); it lives in $MOE_VENDOR_DATA, by default
    ../shared/vendor-data beside the clone. Missing, the test fails under CI=true and skips elsewhere,
    saying what is missing.
    """
    path = VENDOR_DATA / relative
    if not path.exists():
        message = f"reference data missing: {path} (set MOE_VENDOR_DATA to the vendor-data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


# ------------------------------------------------------------------------------------- Ray's actors


def alive_actors(class_name: str) -> list:
    """The ALIVE actors of a class in the session's cluster (its address given: the state API refuses to
    guess whenever another Ray instance runs on this machine)."""
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, detail=True)


def replica_actor(app: str):
    """The one engine replica of a Serve app."""
    replicas = alive_actors(f"ServeReplica:{app}:MoEEngine")
    assert len(replicas) == 1, replicas
    return replicas[0]


def experts_in(pg_id: str) -> dict[int, int]:
    """Bundle index -> pid of the ALIVE expert actors in a placement group."""
    actors = [a for a in alive_actors("ExpertActor") if a.placement_group_id == pg_id]
    bundles = {bundle_of(a): a.pid for a in actors}
    assert len(bundles) == len(actors), "two live expert actors in one bundle"
    return bundles


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie has exited
    except FileNotFoundError:
        return True
