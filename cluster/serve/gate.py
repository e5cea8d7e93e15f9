"""ASGI middleware in front of the API: API keys on /v1 and the request-size limit, before parsing.

Its settings live in this module rather than on the FastAPI app: Serve ships the ingress class to
the replica by value, app included, so state set on "the app" in the replica would land on a copy
that the middleware never sees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cluster.serve.protocol import OpenAIError

_settings = {"api_keys": frozenset(), "max_request_bytes": 1 << 20}

ErrorResponder = Callable[[OpenAIError], Callable[[Scope, Receive, Send], Awaitable[None]]]


def configure(api_keys: set[str], max_request_bytes: int) -> None:
    _settings["api_keys"] = frozenset(api_keys)
    _settings["max_request_bytes"] = max_request_bytes


class Gatekeeper:
    def __init__(self, inner: ASGIApp, respond: ErrorResponder) -> None:
        self.inner, self.respond = inner, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"][len(scope.get("root_path", "")) :]  # Serve mounts apps under a prefix
        keys = _settings["api_keys"]
        if keys and path.startswith("/v1"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if token not in keys:
                err = OpenAIError(401, "missing or invalid API key", code="invalid_api_key")
                return await self.respond(err)(scope, receive, send)
        limit = _settings["max_request_bytes"]
        too_large = OpenAIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await self.respond(too_large)(scope, receive, send)
        body = await _read_body(receive, limit)
        if body is None:
            return await self.respond(too_large)(scope, receive, send)
        return await self.inner(scope, _replay(body, receive), send)


async def _read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The request's body messages, or None once they exceed `limit` bytes (chunked uploads too)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        if message["type"] != "http.request" or not message.get("more_body"):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
