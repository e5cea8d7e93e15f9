"""Errors a caller of a model instance can meet, importable without torch (the HTTP ingress's view)."""

from router.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    MaxTokensExceedContext,
    QueueFull,
    TransportError,
)

__all__ = [
    "ContextLengthExceeded",
    "EngineStopped",
    "InvalidRequest",
    "MaxTokensExceedContext",
    "QueueFull",
    "TransportError",
]


class EngineStopped(RuntimeError):
    """The engine loop has stopped (shut down, or failed); no request can complete on it."""
