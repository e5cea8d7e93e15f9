"""How the engine's errors reach an HTTP client: 400 for bad input, 429 when full, else 503."""

from __future__ import annotations

import ray

from cluster.errors import ContextLengthExceeded, InvalidRequest, QueueFull
from cluster.serve.protocol import OpenAIError


def engine_error(err: Exception) -> OpenAIError:
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    if isinstance(cause, QueueFull):
        return OpenAIError(
            429,
            f"server busy: {cause}",
            type_="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )
    if isinstance(cause, ContextLengthExceeded):
        return OpenAIError(400, str(cause), code="context_length_exceeded", param=cause.param)
    if isinstance(cause, ValueError | InvalidRequest):
        return OpenAIError(400, str(cause), param="prompt" if "prompt" in str(cause) else None)
    return OpenAIError(
        503, f"engine unavailable: {type(cause).__name__}", type_="server_error", code="engine_unavailable"
    )
