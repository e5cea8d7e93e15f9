"""The ingress's request counter: `moe_requests_total{status}`, the status each HTTP request ended with.

Torch-free: the CPU ingress imports it.
"""

from __future__ import annotations

from ray.util.metrics import Counter


class RequestMetrics:
    """The ingress's count of finished HTTP requests by status code."""

    def __init__(self, model: str) -> None:
        self.requests = Counter(
            "moe_requests", "HTTP requests by the status they ended with", tag_keys=("model", "status")
        ).set_default_tags({"model": model})

    def record(self, status: int) -> None:
        self.requests.inc(1, {"status": str(status)})


# The ingress process's request counter. Module state rather than FastAPI's app.state: Serve pickles the
# ingress class by value, so its methods and the module's functions do not see the same `app` object.
_requests: RequestMetrics | None = None


def start_request_metrics(model: str) -> None:
    global _requests
    _requests = RequestMetrics(model)


def count_request(status: int) -> None:
    """Counts a finished API request by its HTTP status (nothing before start_request_metrics)."""
    if _requests is not None:
        _requests.record(status)
