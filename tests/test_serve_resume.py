"""The ingress resuming a stream whose engine replica died: a real Serve replica, killed by its own exit.

The replica is scripted rather than the engine, so that it dies at an exact point of the stream: after
some tokens, or after the finishing one (the race test_chaos's kills hit by chance). It writes down
every request it gets, so the test sees whether the ingress resumed and with what.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray import serve

from cluster.serve.messages import Accepted, GenerateRequest, Sampling, TokenChunk
from cluster.serve.streaming import resumable_stream

TOKENS = list(range(100, 108))


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, health_check_period_s=1, health_check_timeout_s=5)
class ScriptedReplica:
    """Streams TOKENS, or the rest of them on a resumed request. The first replica of the app exits
    right after sending `lose_after` tokens; the one Serve starts in its place does not."""

    def __init__(self, lose_after: int, workdir: str) -> None:
        self.requests = Path(workdir) / "requests"
        first = Path(workdir) / "first-replica"
        self.lose_after = 0 if first.exists() else lose_after
        first.touch()

    async def generate(self, request: GenerateRequest):
        resume = request.resume
        start = len(resume.output_ids) if resume else 0
        with self.requests.open("a") as log:
            log.write(f"resume {start} {resume.sent_chars}\n" if resume else "fresh\n")
        if start >= len(TOKENS):
            raise ValueError("resumed with nothing left to generate")
        yield Accepted(3, [1, 2, 3])
        for i in range(start, len(TOKENS)):
            yield TokenChunk(f"t{i}", TOKENS[i], "length" if i == len(TOKENS) - 1 else None)
            if i + 1 == self.lose_after:
                await asyncio.sleep(0.5)  # the chunks sent so far reach the caller first
                os._exit(1)


@pytest.fixture
def scripted_app(serve_http, tmp_path) -> Iterator[Callable[[int], object]]:
    names: list[str] = []

    def deploy(lose_after: int):
        name = f"resume-{len(names)}-{tmp_path.name}"
        names.append(name)
        serve.run(ScriptedReplica.bind(lose_after, str(tmp_path)), name=name, route_prefix=None)
        return serve.get_deployment_handle("ScriptedReplica", app_name=name).options(stream=True)

    yield deploy
    for name in names:
        serve.delete(name)


def stream_through_ingress(handle) -> list[Accepted | TokenChunk]:
    async def drain() -> list[Accepted | TokenChunk]:
        request = GenerateRequest(Sampling(max_tokens=len(TOKENS)), prompt="x")
        return [item async for item in resumable_stream(handle, request)]

    return asyncio.run(asyncio.wait_for(drain(), timeout=120))


def requests_seen(workdir: Path) -> list[str]:
    return (workdir / "requests").read_text().splitlines()


def test_a_replica_lost_mid_stream_is_resumed_with_the_tokens_already_sent(scripted_app, tmp_path):
    items = stream_through_ingress(scripted_app(lose_after=3))

    assert isinstance(items[0], Accepted)
    assert [c.token_id for c in items[1:]] == TOKENS
    assert [c.finish_reason for c in items[1:]] == [None] * (len(TOKENS) - 1) + ["length"]
    assert requests_seen(tmp_path) == ["fresh", "resume 3 6"]  # 3 tokens and their 6 characters


def test_a_replica_lost_after_the_finishing_token_ends_the_stream_without_a_resume(scripted_app, tmp_path):
    items = stream_through_ingress(scripted_app(lose_after=len(TOKENS)))

    assert [c.token_id for c in items[1:]] == TOKENS
    assert items[-1].finish_reason == "length"
    assert requests_seen(tmp_path) == ["fresh"]
