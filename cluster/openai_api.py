"""The OpenAI-compatible HTTP ingress (CPU only): validation, auth, SSE streaming, response shapes."""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.api_gate import Gatekeeper, configure
from cluster.async_engine import EngineStopped
from cluster.metrics import count_request, start_request_metrics
from cluster.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    error_from_validation,
    now,
)
from cluster.serve_options import ServeOptions
from router.engine_core import InvalidRequest
from router.scheduler import QueueFull

log = logging.getLogger(__name__)
app = FastAPI(title="moe-cluster", description="OpenAI-compatible API for sparse MoE models on Ray")


def _error_response(err: OpenAIError) -> JSONResponse:
    count_request(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(error_from_validation(list(exc.errors())))


@app.exception_handler(OpenAIError)
async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths, wrong methods and bodies FastAPI cannot parse: OpenAI's shape, not {"detail"}."""
    return _error_response(OpenAIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _error_response(OpenAIError(500, f"internal error: {type(exc).__name__}", type_="server_error"))


app.add_middleware(Gatekeeper, respond=_error_response)


def _engine_error(err: Exception) -> OpenAIError:
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    if isinstance(cause, QueueFull):
        return OpenAIError(
            429,
            f"server busy: {cause}",
            type_="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(cause, ValueError | InvalidRequest):
        return OpenAIError(400, str(cause), param="prompt" if "prompt" in str(cause) else None)
    return OpenAIError(
        503, f"engine unavailable: {type(cause).__name__}", type_="server_error", code="engine_unavailable"
    )


def _sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None, choice: int) -> dict:
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": None if body.seed is None else body.seed + choice,
        "logprobs": logprobs,
    }


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_logprobs(events: list[dict]) -> dict:
    return {
        "tokens": [e["token"] for e in events],
        "token_logprobs": [e["logprob"] for e in events],
        "top_logprobs": [dict(e["top_logprobs"]) for e in events],
    }


def _chat_logprobs(events: list[dict]) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [
        {**entry(e["token"], e["logprob"]), "top_logprobs": [entry(t, lp) for t, lp in e["top_logprobs"]]}
        for e in events
    ]


async def _collect(streams: list[AsyncIterator[dict]]) -> tuple[list[list[dict]], int]:
    async def drain(stream: AsyncIterator[dict]) -> list[dict]:
        return [event async for event in stream]

    try:
        choices = await asyncio.gather(*(drain(s) for s in streams))
    except Exception as err:
        raise _engine_error(err) from None
    return choices, sum(len(c) for c in choices)


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Interleaves the choices' token events as they arrive; cancels them all if the client leaves."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[dict]) -> None:
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
                raise _engine_error(item)
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


async def resumable_stream(handle: DeploymentHandle, request: dict) -> AsyncIterator[dict]:
    """One choice's engine stream; if the replica serving it is lost, it resumes on another one.

    The resumed request carries the prompt and the tokens the client already has, so the new replica
    prefills them and goes on: every token reaches the client once, and greedy text is unchanged.
    """
    prompt_ids: list[int] | None = None
    output_ids: list[int] = []
    sent = resumes = 0
    while True:
        stream = handle.generate.remote(request)
        try:
            async for event in stream:
                if "prompt_ids" in event:
                    if prompt_ids is None:
                        prompt_ids = event["prompt_ids"]
                        yield event
                    continue
                output_ids.append(event["token_id"])
                sent += len(event["text"])
                yield event
            return
        except Exception as err:
            if not _replica_lost(err) or resumes >= MAX_RESUMES:
                raise
            resumes += 1
            log.warning("engine replica lost after %d tokens (%r); resuming elsewhere", len(output_ids), err)
            if prompt_ids is not None:
                resume = {"prompt_ids": prompt_ids, "output_ids": list(output_ids), "sent": sent}
                request = {**request, "resume": resume}
        finally:
            stream.cancel()


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
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


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, options: dict[str, Any]) -> None:
        self.options = ServeOptions.model_validate(options)
        self.engine = engine
        self.stream_handle = engine.options(stream=True)
        self.model_name = self.options.model_name()
        configure(self.options.api_keys(), self.options.max_request_bytes)
        start_request_metrics(self.model_name)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            ready = await self.engine.ready.remote()
        except Exception as err:  # any engine failure means not ready
            return JSONResponse({"status": "unavailable", "error": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": now(), "owned_by": "moe-cluster"}
        return {"object": "list", "data": [card]}

    def _check_model(self, body: SamplingFields) -> None:
        if body.model != self.model_name:
            raise OpenAIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _open(self, requests: list[dict]) -> tuple[list[AsyncIterator[dict]], int]:
        """Starts one engine stream per choice; returns them and the prompt length once all are accepted."""
        streams = [resumable_stream(self.stream_handle, r) for r in requests]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            for s in streams:
                await s.aclose()
            raise _engine_error(failed[0]) from None
        return streams, firsts[0]["prompt_tokens"]

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check_model(body)
        requests = [
            {
                "prompt": body.prompt,
                "stop": body.stop_list(),
                "params": _sampling(body, body.max_tokens, body.logprobs, i),
            }
            for i in range(body.n)
        ]
        streams, prompt_tokens = await self._open(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", now()
        shape = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        with_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(self._completion_chunks(streams, shape, with_logprobs, prompt_tokens, include_usage))
        choices, used = await _collect(streams)
        count_request(200)
        return {
            **shape,
            "choices": [
                {
                    "index": i,
                    "text": "".join(e["text"] for e in events),
                    "finish_reason": events[-1]["finish_reason"],
                    "logprobs": _completion_logprobs(events) if with_logprobs else None,
                }
                for i, events in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, used),
        }

    async def _completion_chunks(self, streams, shape, with_logprobs, prompt_tokens, include_usage):
        used = 0
        async for index, event in _merge(streams):
            used += 1
            choice = {
                "index": index,
                "text": event["text"],
                "finish_reason": event["finish_reason"],
                "logprobs": _completion_logprobs([event]) if with_logprobs else None,
            }
            yield {**shape, "choices": [choice]}
        if include_usage:
            yield {**shape, "choices": [], "usage": _usage(prompt_tokens, used)}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_model(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            {
                "messages": messages,
                "stop": body.stop_list(),
                "params": _sampling(body, body.max_new_tokens(), logprobs, i),
            }
            for i in range(body.n)
        ]
        streams, prompt_tokens = await self._open(requests)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", now()
        shape = {"id": rid, "created": created, "model": self.model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _sse(
                self._chat_chunks(streams, body.n, shape, body.logprobs, prompt_tokens, include_usage)
            )
        choices, used = await _collect(streams)
        count_request(200)
        return {
            **shape,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "finish_reason": events[-1]["finish_reason"],
                    "message": {"role": "assistant", "content": "".join(e["text"] for e in events)},
                    "logprobs": {"content": _chat_logprobs(events)} if body.logprobs else None,
                }
                for i, events in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, used),
        }

    async def _chat_chunks(self, streams, n, shape, with_logprobs, prompt_tokens, include_usage):
        chunk = {**shape, "object": "chat.completion.chunk"}
        for index in range(n):
            start = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield {**chunk, "choices": [start]}
        used = 0
        async for index, event in _merge(streams):
            used += 1
            choice = {
                "index": index,
                "delta": {"content": event["text"]} if event["text"] else {},
                "finish_reason": event["finish_reason"],
                "logprobs": {"content": _chat_logprobs([event])} if with_logprobs else None,
            }
            yield {**chunk, "choices": [choice]}
        if include_usage:
            yield {**chunk, "choices": [], "usage": _usage(prompt_tokens, used)}
