"""The errors a request can meet, free of torch so that the HTTP ingress can catch them cheaply."""


class InvalidRequest(ValueError):
    """A request that can never be served as given (the message says which field and why)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit in the model's context (leaving room for one token)."""

    param = "prompt"


class MaxTokensExceedContext(ContextLengthExceeded):
    """The prompt plus the max_tokens asked for do not fit in the model's context."""

    param = "max_tokens"


class QueueFull(RuntimeError):
    """Every sequence slot is taken and the waiting queue is at its limit; retry later."""


class TransportError(RuntimeError):
    """A collective failed or timed out; the group must be rebuilt before it is used again.

    `rank` is the peer the failed call talked to, where the caller knows it (the router's exchange
    sets it), so that recovery can tell which expert rank to look at first.
    """

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
