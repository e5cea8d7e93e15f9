"""Load on the real Serve app: 64 concurrent streams for a minute, then a burst past the admission limits.

The app "load" (one engine replica, two expert shards) admits max_num_seqs running and max_waiting
waiting sequences within a fixed KV budget. Under a minute of 64 concurrent greedy streams nothing may
fail and the memory of the engine's processes (sampled once a second) must stay within the KV budget
plus a fixed allowance; a burst beyond the limits must be refused with 429 up front, while every
accepted request runs to its end. Measurements go to RESULTS_PATH (and to stdout under `pytest -s`).
A stub engine core pins down the admission rule itself: a request is refused up front or served, never
accepted and refused later.
"""

from __future__ import annotations

import asyncio
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from ray import serve

from cluster.instance.engine_loop import EngineLoop, LoopCore
from router.config import ModelConfig
from router.errors import QueueFull
from router.kv_cache import KVCache
from router.sampling import SamplingParams
from router.tokenizer import Tokenizer
from tests.conftest import served_app, served_model
from tests.toolkit import (
    Stream,
    StubCore,
    astream_completion,
    experts_in,
    record_result,
    replica_actor,
    wait_for,
)

pytestmark = pytest.mark.slow

APP = "load"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS, MAX_WAITING = 64, 16
KV_BUDGET = 20 << 20  # the sliding-window pool for 64 sequences takes 16 MiB of it, the rest is full blocks
OPTIONS = {
    "expert_shards": 2,
    "router_cpus": 0.5,
    "expert_cpus": 0.5,
    "max_model_len": MAX_MODEL_LEN,
    "max_num_seqs": MAX_NUM_SEQS,
    "max_waiting": MAX_WAITING,
    "kv_cache_bytes": KV_BUDGET,
}
CLIENTS, DURATION_S, LOAD_TOKENS = 64, 60.0, 16
RSS_ALLOWANCE = 256 << 20
BURST, BURST_PROMPT, BURST_TOKENS = 128, "A computer program", 200  # runs past 200 tokens without an end
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=30.0)
RESULTS_PATH = Path("/tmp/moe_cluster_load.json")

SUBJECTS = ["The harbour town", "A computer program", "The weather today", "When you cook rice"]


def load_prompt(client: int, request: int) -> str:
    return f"{SUBJECTS[client % len(SUBJECTS)]} {client} {request % 7}"


def engine_pids(app: str) -> dict[str, int]:
    """The engine replica's process and its expert actors' processes (those in its placement group)."""
    replica = replica_actor(app)
    pids = {"replica": replica.pid}
    pids.update({f"expert{bundle}": pid for bundle, pid in experts_in(replica.placement_group_id).items()})
    assert len(pids) == 1 + OPTIONS["expert_shards"], pids
    return pids


def engine_handle(app: str = APP):
    return serve.get_deployment_handle("MoEEngine", app_name=app)


class Sampler:
    """Once a second: the engine processes' RSS and the engine's ongoing sequences, in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.rss: list[int] = []
        self.ongoing: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        try:
            self.rss.append(sum(p.memory_info().rss for p in self.processes.values()))
        except psutil.Error as err:  # a process of the engine went away: that alone is a failure
            self.errors.append(repr(err))
        try:
            stats = engine_handle().record_autoscaling_stats.remote().result(timeout_s=30)
            self.ongoing.append(stats["ongoing_sequences"])
        except Exception as err:
            self.errors.append(repr(err))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.sample()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def load_url(serve_http, demo_model) -> Iterator[str]:
    with served_app(serve_http, APP, {"model": str(demo_model), **OPTIONS}) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(load_url) -> str:
    return served_model(load_url)


def record(key: str, value: object) -> None:
    record_result(RESULTS_PATH, key, value)


def test_kv_budget_holds_every_load_stream(demo_model):
    """Precondition of the load test: the budget is the one the engine gets, and 64 streams fit in it."""
    config = ModelConfig.from_model_dir(demo_model)
    cache = KVCache(config, KV_BUDGET, MAX_NUM_SEQS, 16, torch.float32, torch.device("cpu"))
    assert cache.nbytes <= KV_BUDGET
    tokenizer = Tokenizer.from_model_dir(demo_model)
    longest = max(len(tokenizer.encode(load_prompt(c, r))) for c in range(CLIENTS) for r in range(7))
    assert CLIENTS * cache.blocks_for(longest + LOAD_TOKENS) <= cache.full.num_blocks
    # a burst request fits alone, but fewer than max_num_seqs of them fit at once: the KV budget binds
    burst_blocks = cache.blocks_for(len(tokenizer.encode(BURST_PROMPT)) + BURST_TOKENS)
    assert burst_blocks <= cache.full.num_blocks < MAX_NUM_SEQS * burst_blocks


# ------------------------------------------------------------------------------------------- admission


SLOTS = 4


class _QueueOnlyCore(StubCore):
    """An EngineCore that only queues, in a real Scheduler, and never steps (nothing leaves the queue).

    Its add_request takes a few milliseconds before the sequence reaches the queue, as the real one's
    validation can on a busy machine.
    """

    def __init__(self) -> None:
        super().__init__(max_num_seqs=SLOTS, max_waiting=MAX_WAITING)
        self.failed = 0  # add_request calls that raised (the engine loop then fails that one request)

    def add_request(self, prompt_ids, params, request_id=None) -> str:
        time.sleep(0.005)  # the work itself, not a wait for something
        try:
            self.scheduler.add(types.SimpleNamespace(request_id=request_id, blocks=None))
        except Exception:
            self.failed += 1
            raise
        return request_id

    def handled(self) -> int:
        """Requests that reached this core, queued or failed."""
        return len(self.scheduler.waiting) + len(self.scheduler.running) + self.failed


def test_a_request_accepted_is_never_refused_afterwards():
    """submit() either refuses (QueueFull, the ingress's 429) or the request is queued: never both."""
    core = _QueueOnlyCore()
    assert isinstance(core, LoopCore)
    engine = EngineLoop(core)

    async def run() -> tuple[int, int, int]:
        accepted, refused = [], 0
        for _ in range(200):  # a steady stream of arrivals against a queue that never drains
            try:
                accepted.append(engine.submit([1], SamplingParams(max_tokens=1)))
            except QueueFull:
                refused += 1
            await asyncio.sleep(0.001)
        queued = len(accepted)
        assert wait_for(lambda: core.handled() == queued, 30), "accepted requests never reached the core"
        dropped = 0
        for stream in accepted:
            try:
                await asyncio.wait_for(stream.__anext__(), 0.05)
            except QueueFull:
                dropped += 1  # accepted, then failed: after an HTTP 200 this is an error event in the stream
            except TimeoutError:
                pass  # still waiting, as it should
        return len(accepted), refused, dropped

    try:
        accepted, refused, dropped = asyncio.run(run())
    finally:
        engine.stop()
    assert dropped == 0, f"{dropped} of {accepted} accepted requests were refused after acceptance"
    # room for the sequence slots plus max_waiting behind them, and not one more
    assert (accepted, refused) == (SLOTS + MAX_WAITING, 200 - SLOTS - MAX_WAITING)


def test_simultaneous_requests_within_free_sequence_slots_are_all_admitted(load_url, model_name):
    """64 clients starting together on an idle engine: within max_num_seqs, so none is a queue overflow."""

    async def run() -> list[Stream]:
        limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
        async with httpx.AsyncClient(base_url=load_url, timeout=HTTP_TIMEOUT, limits=limits) as http:
            prompts = [load_prompt(i, 0) for i in range(CLIENTS)]
            return await asyncio.gather(
                *(astream_completion(http, model_name, p, LOAD_TOKENS) for p in prompts)
            )

    assert engine_handle().record_autoscaling_stats.remote().result(timeout_s=60)["ongoing_sequences"] == 0
    results = asyncio.run(run())
    refused = [r.body for r in results if r.status == 429]
    assert not refused, f"{len(refused)} of {CLIENTS} refused with 64 free sequence slots: {refused[0]}"
    assert all(r.complete for r in results), [(r.status, r.errors[:1]) for r in results if not r.complete]


# -------------------------------------------------------------------------------------------------- load


@pytest.mark.timeout(900)
def test_64_streams_for_a_minute_without_errors_in_bounded_memory(load_url, model_name):
    warm = asyncio.run(_one(load_url, model_name, load_prompt(0, 0), LOAD_TOKENS))
    assert warm.complete, warm
    pids = engine_pids(APP)
    before = engine_handle().recovery_stats.remote().result(timeout_s=60)

    async def client(http: httpx.AsyncClient, index: int, deadline: float, results: list) -> None:
        request = 0
        while time.monotonic() < deadline:
            results.append(
                await astream_completion(http, model_name, load_prompt(index, request), LOAD_TOKENS)
            )
            request += 1

    async def run() -> list[list[Stream]]:
        limits = httpx.Limits(max_connections=CLIENTS * 2, max_keepalive_connections=CLIENTS * 2)
        async with httpx.AsyncClient(base_url=load_url, timeout=HTTP_TIMEOUT, limits=limits) as http:
            deadline = time.monotonic() + DURATION_S
            per_client: list[list[Stream]] = [[] for _ in range(CLIENTS)]
            await asyncio.gather(*(client(http, i, deadline, per_client[i]) for i in range(CLIENTS)))
            return per_client

    with Sampler(pids) as sampler:
        started = time.monotonic()
        per_client = asyncio.run(run())
        elapsed = time.monotonic() - started

    results = [r for rs in per_client for r in rs]
    failed = [r for r in results if not r.complete]
    tokens = sum(len(r.chunks) for r in results)
    numbers = {
        "requests_completed": len(results) - len(failed),
        "errors": len(failed),
        "seconds": round(elapsed, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "requests_per_s": round(len(results) / elapsed, 2),
        "peak_ongoing_sequences": max(sampler.ongoing, default=0),
        "rss_mib_start": round(sampler.rss[0] / 2**20, 1),
        "rss_mib_min": round(min(sampler.rss) / 2**20, 1),
        "rss_mib_max": round(max(sampler.rss) / 2**20, 1),
        "rss_samples": len(sampler.rss),
        "kv_budget_mib": KV_BUDGET / 2**20,
    }
    record("load", numbers)

    # memory bounded by the KV budget, and nothing failed underneath: same processes, no recovery
    assert not sampler.errors, sampler.errors[:3]
    assert len(sampler.rss) >= DURATION_S / 2, "RSS was not sampled throughout the run"
    growth = max(sampler.rss) - sampler.rss[0]
    assert growth < KV_BUDGET + RSS_ALLOWANCE, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert engine_pids(APP) == pids
    assert engine_handle().recovery_stats.remote().result(timeout_s=60) == before
    assert elapsed < DURATION_S + 120, "the load did not stop itself at its deadline"
    assert max(sampler.ongoing) >= CLIENTS // 2, f"at most {max(sampler.ongoing)} sequences ran at once"
    # no request accepted and then dropped
    dropped = [r for r in failed if r.status == 200]
    assert not dropped, [(r.errors[:1], r.finish_reason, r.done) for r in dropped[:3]]
    # and none refused or failed at all: 64 clients never exceed max_num_seqs
    refused = sum(r.status == 429 for r in failed)
    assert not failed, (
        f"{len(failed)} of {len(results)} failed, {refused} of them with 429",
        [(r.status, r.body or r.errors[:1]) for r in failed[:3]],
    )
    assert all(per_client), "a client never completed a request"


async def _one(url: str, model: str, prompt: str, max_tokens: int) -> Stream:
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT) as http:
        return await astream_completion(http, model, prompt, max_tokens)


# ------------------------------------------------------------------------------------------------- burst


@pytest.mark.timeout(900)
def test_burst_beyond_the_queue_is_refused_with_429_and_accepted_requests_finish(load_url, model_name):
    async def run() -> list[Stream]:
        limits = httpx.Limits(max_connections=BURST * 2, max_keepalive_connections=BURST * 2)
        async with httpx.AsyncClient(base_url=load_url, timeout=HTTP_TIMEOUT, limits=limits) as http:
            return await asyncio.gather(
                *(astream_completion(http, model_name, BURST_PROMPT, BURST_TOKENS) for _ in range(BURST))
            )

    started = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - started
    accepted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    record(
        "burst",
        {
            "requests": BURST,
            "accepted": len(accepted),
            "refused_429": len(refused),
            "other": len(results) - len(accepted) - len(refused),
            "seconds": round(elapsed, 1),
        },
    )

    assert len(accepted) + len(refused) == BURST, sorted({r.status for r in results})
    assert refused, "nothing was refused beyond max_num_seqs + max_waiting"
    assert len(accepted) > MAX_WAITING, "fewer accepted than the waiting queue alone holds"
    for r in refused:
        assert r.headers.get("retry-after", "").isdigit(), r.headers
        assert r.headers["content-type"].startswith("application/json")
        assert r.body is not None and set(r.body) == {"error"}, r.body
        error = r.body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full", error
        assert error["message"]
    # accepted means served to the end, never dropped: the full greedy text, the same for all of them
    for r in accepted:
        assert r.complete, (r.errors[:1], r.finish_reason, r.completion_tokens, len(r.chunks))
        assert r.finish_reason == "length" and r.completion_tokens == BURST_TOKENS
    assert len({"".join(r.chunks) for r in accepted}) == 1

    # and the engine is fine afterwards
    assert httpx.get(f"{load_url}/health", timeout=60).status_code == 200
    after = asyncio.run(_one(load_url, model_name, BURST_PROMPT, 4))
    assert after.complete and after.completion_tokens == 4
