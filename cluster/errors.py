"""Errors a caller of a model instance can meet, importable without torch (the HTTP ingress's view)."""

from router.errors import InvalidRequest, QueueFull, TransportError

__all__ = ["EngineStopped", "InvalidRequest", "QueueFull", "TransportError"]


class EngineStopped(RuntimeError):
    """The engine loop has stopped (shut down, or failed); no request can complete on it."""
