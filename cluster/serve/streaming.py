"""Streams between the ingress and the engine replicas: resuming a lost one, merging choices, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import ray
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentHandle

from cluster.errors import EngineStopped
from cluster.metrics.requests import count_request
from cluster.serve.errors import engine_error
from cluster.serve.messages import Accepted, GenerateRequest, Resume, TokenChunk
from cluster.serve.protocol import OpenAIError

log = logging.getLogger(__name__)


async def collect(streams: list[AsyncIterator[TokenChunk]]) -> tuple[list[list[TokenChunk]], int]:
    async def drain(stream: AsyncIterator[TokenChunk]) -> list[TokenChunk]:
        return [event async for event in stream]

    try:
        choices = await asyncio.gather(*(drain(s) for s in streams))
    except Exception as err:
        raise engine_error(err) from None
    return choices, sum(len(c) for c in choices)


async def merge(streams: list[AsyncIterator[TokenChunk]]) -> AsyncIterator[tuple[int, TokenChunk]]:
    """Interleaves the choices' token events as they arrive; cancels them all if the client leaves."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TokenChunk]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as err:
            await queue.put((index, err))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(tasks)
    try:
        while open_streams:
            index, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise engine_error(item)
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


MAX_RESUMES = 3


def _replica_lost(err: Exception) -> bool:
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    return isinstance(
        cause, ray.exceptions.RayActorError | ray.exceptions.ActorUnavailableError | EngineStopped
    )


async def resumable_stream(
    handle: DeploymentHandle, request: GenerateRequest
) -> AsyncIterator[Accepted | TokenChunk]:
    """One choice's engine stream; if the replica serving it is lost, it resumes on another one.

    The resumed request carries the prompt and the tokens the client already has, so the new replica
    prefills them and goes on: every token reaches the client once, and greedy text is unchanged. A
    replica lost after it sent the finishing token has nothing left to resume: the stream is complete.
    """
    prompt_ids: list[int] | None = None
    output_ids: list[int] = []
    sent = resumes = 0
    finished = False
    while True:
        stream = handle.generate.remote(request)
        try:
            async for item in stream:
                if isinstance(item, Accepted):
                    if prompt_ids is None:
                        prompt_ids = item.prompt_ids
                        yield item
                    continue
                output_ids.append(item.token_id)
                sent += len(item.text)
                finished = item.finish_reason is not None
                yield item
            return
        except Exception as err:
            lost = _replica_lost(err)
            if lost and finished:
                return
            if not lost or resumes >= MAX_RESUMES:
                raise
            resumes += 1
            log.warning("engine replica lost after %d tokens (%r); resuming elsewhere", len(output_ids), err)
            if prompt_ids is not None:
                request = request.resumed(Resume(prompt_ids, list(output_ids), sent))
        finally:
            stream.cancel()


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        status = 500
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            status = 200
        except OpenAIError as err:  # the response has started: report in-band, as OpenAI does
            status = err.status
            yield f"data: {json.dumps(err.body())}\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status = 499  # the client went away
            raise
        finally:
            count_request(status)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
