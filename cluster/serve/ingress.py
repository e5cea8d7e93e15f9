"""The OpenAI-compatible HTTP ingress (CPU only): validation, auth, SSE streaming, response shapes."""

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.metrics.requests import count_request, start_request_metrics
from cluster.options.serve import ServeOptions
from cluster.serve.chat import chat_chunks, chat_requests, chat_response
from cluster.serve.choices import open_streams
from cluster.serve.completions import completion_chunks, completion_requests, completion_response
from cluster.serve.gate import Gatekeeper, configure
from cluster.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    SamplingFields,
    error_from_validation,
    now,
)
from cluster.serve.responses import ResponsesRequest, responses_events, responses_response, responses_shape
from cluster.serve.streaming import sse

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


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, options: dict[str, Any]) -> None:
        self.options = ServeOptions.model_validate(options)
        self.engine = engine
        self.stream_handle = engine.options(stream=True)
        self.model_name = self.options.model_name()
        self.tool_parser = self.options.tool_parser()
        configure(self.options.api_keys(), self.options.max_request_bytes)
        start_request_metrics(self.model_name)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            ready = await self.engine.ready.remote()
        except Exception as err:  # any engine failure means not ready
            return JSONResponse({"status": "unavailable", "error": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    def _card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": now(), "owned_by": "moe-cluster"}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        self._check_model(model_id)
        return self._card()

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _check(self, body: SamplingFields) -> None:
        self._check_model(body.model)
        body.check()

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check(body)
        opened = await open_streams(self.stream_handle, completion_requests(body))
        shape = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": now()}
        shape["model"] = self.model_name
        if body.stream:
            return sse(completion_chunks(body, opened, shape))
        response = await completion_response(body, opened, shape)
        count_request(200)
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check(body)
        opened = await open_streams(self.stream_handle, chat_requests(body))
        shape = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": now(), "model": self.model_name}
        if body.stream:
            return sse(chat_chunks(body, opened, shape, self.tool_parser))
        response = await chat_response(body, opened, shape, self.tool_parser)
        count_request(200)
        return response

    @app.post("/v1/responses")
    async def responses(self, body: ResponsesRequest):
        self._check_model(body.model)
        chat = body.as_chat()
        opened = await open_streams(self.stream_handle, chat_requests(chat))
        shape = responses_shape(body, self.model_name)
        if body.stream:
            return sse(responses_events(chat, opened, shape, self.tool_parser))
        response = await responses_response(chat, opened, shape, self.tool_parser)
        count_request(200)
        return response
