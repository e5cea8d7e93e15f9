"""The OpenAI-compatible HTTP ingress (CPU only): validation, auth, SSE streaming, response shapes."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.metrics.requests import count_request, start_request_metrics
from cluster.options.serve import ServeOptions
from cluster.serve.errors import engine_error
from cluster.serve.gate import Gatekeeper, configure
from cluster.serve.messages import GenerateRequest, Sampling, TokenChunk
from cluster.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    error_from_validation,
    now,
)
from cluster.serve.streaming import collect, merge, resumable_stream, sse

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


def _sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None, choice: int) -> Sampling:
    seed = None if body.seed is None else body.seed + choice
    return Sampling(max_tokens, body.temperature, body.top_p, body.top_k, seed, logprobs)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage; cached_tokens: the prompt tokens the engine's prefix cache supplied (choice 0's)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _cached(choices: list[list[TokenChunk]]) -> int:
    return choices[0][0].cached_tokens if choices and choices[0] else 0


def _completion_logprobs(chunks: list[TokenChunk]) -> dict:
    logprobs = [c.logprobs for c in chunks if c.logprobs is not None]
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [dict(lp.top) for lp in logprobs],
    }


def _chat_logprobs(chunks: list[TokenChunk]) -> list[dict]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in (c.logprobs for c in chunks)
        if lp is not None
    ]


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

    async def _open(self, requests: list[GenerateRequest]) -> tuple[list[AsyncIterator[TokenChunk]], int]:
        """Starts one engine stream per choice; returns them and the prompt length once all are accepted."""
        streams = [resumable_stream(self.stream_handle, r) for r in requests]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        failed = [f for f in firsts if isinstance(f, BaseException)]
        if failed:
            for s in streams:
                await s.aclose()
            raise engine_error(failed[0]) from None
        return streams, firsts[0].prompt_tokens

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check_model(body)
        requests = [
            GenerateRequest(
                _sampling(body, body.max_tokens, body.logprobs, i), prompt=body.prompt, stop=body.stop_list()
            )
            for i in range(body.n)
        ]
        streams, prompt_tokens = await self._open(requests)
        rid, created = f"cmpl-{uuid.uuid4().hex}", now()
        shape = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        with_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return sse(self._completion_chunks(streams, shape, with_logprobs, prompt_tokens, include_usage))
        choices, used = await collect(streams)
        count_request(200)
        return {
            **shape,
            "choices": [
                {
                    "index": i,
                    "text": "".join(c.text for c in chunks),
                    "finish_reason": chunks[-1].finish_reason,
                    "logprobs": _completion_logprobs(chunks) if with_logprobs else None,
                }
                for i, chunks in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, used, _cached(choices)),
        }

    async def _completion_chunks(self, streams, shape, with_logprobs, prompt_tokens, include_usage):
        used = cached = 0
        async for index, chunk in merge(streams):
            used += 1
            cached = chunk.cached_tokens if index == 0 else cached
            choice = {
                "index": index,
                "text": chunk.text,
                "finish_reason": chunk.finish_reason,
                "logprobs": _completion_logprobs([chunk]) if with_logprobs else None,
            }
            yield {**shape, "choices": [choice]}
        if include_usage:
            yield {**shape, "choices": [], "usage": _usage(prompt_tokens, used, cached)}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_model(body)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = [
            GenerateRequest(
                _sampling(body, body.max_new_tokens(), logprobs, i), messages=messages, stop=body.stop_list()
            )
            for i in range(body.n)
        ]
        streams, prompt_tokens = await self._open(requests)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", now()
        shape = {"id": rid, "created": created, "model": self.model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return sse(self._chat_chunks(streams, body.n, shape, body.logprobs, prompt_tokens, include_usage))
        choices, used = await collect(streams)
        count_request(200)
        return {
            **shape,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "finish_reason": chunks[-1].finish_reason,
                    "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
                    "logprobs": {"content": _chat_logprobs(chunks)} if body.logprobs else None,
                }
                for i, chunks in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, used, _cached(choices)),
        }

    async def _chat_chunks(self, streams, n, shape, with_logprobs, prompt_tokens, include_usage):
        envelope = {**shape, "object": "chat.completion.chunk"}
        for index in range(n):
            start = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield {**envelope, "choices": [start]}
        used = cached = 0
        async for index, chunk in merge(streams):
            used += 1
            cached = chunk.cached_tokens if index == 0 else cached
            choice = {
                "index": index,
                "delta": {"content": chunk.text} if chunk.text else {},
                "finish_reason": chunk.finish_reason,
                "logprobs": {"content": _chat_logprobs([chunk])} if with_logprobs else None,
            }
            yield {**envelope, "choices": [choice]}
        if include_usage:
            yield {**envelope, "choices": [], "usage": _usage(prompt_tokens, used, cached)}
