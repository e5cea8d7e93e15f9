"""One request's tokens and progress inside the router."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from router.kv_cache import SequenceBlocks
from router.sampling import SamplingState


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingState
    max_len: int  # prompt + generated tokens never exceed this (min of request and model limits)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    blocks: SequenceBlocks | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its full blocks so far
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        prompt = len(self.prompt_ids)
        if stop <= prompt:
            return self.prompt_ids[start:stop]
        if start >= prompt:
            return self.output_ids[start - prompt : stop - prompt]
        return self.prompt_ids[start:] + self.output_ids[: stop - prompt]
