"""What both endpoints do per choice: sampling fields from the body, engine streams, usage, logprobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from cluster.serve.errors import engine_error
from cluster.serve.messages import Accepted, GenerateRequest, Sampling, TokenChunk
from cluster.serve.protocol import SamplingFields
from cluster.serve.streaming import resumable_stream


def sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None, choice: int) -> Sampling:
    """Choice i of a seeded request draws with seed + i, so n > 1 gives n different, reproducible texts."""
    seed = None if body.seed is None else body.seed + choice
    return Sampling(
        max_tokens,
        body.temperature,
        body.top_p,
        body.top_k,
        seed,
        logprobs,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.bias_pairs(),
        min_tokens=body.min_tokens,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
    )


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: the prompt tokens the engine's prefix cache supplied."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class CachedTokens:
    """The prefix-cache tokens of each prompt, read from its first choice's first token."""

    def __init__(self, n: int) -> None:
        self.n, self.per_choice = n, {}

    def see(self, index: int, chunks: list[TokenChunk]) -> None:
        if index % self.n == 0 and chunks and index not in self.per_choice:
            self.per_choice[index] = chunks[0].cached_tokens

    def total(self) -> int:
        return sum(self.per_choice.values())


@dataclass
class Opened:
    streams: list[AsyncIterator[TokenChunk]]
    accepted: list[Accepted]


async def open_streams(handle: DeploymentHandle, requests: list[GenerateRequest]) -> Opened:
    """Starts one engine stream per choice and waits until every one is admitted (or one is refused)."""
    streams = [resumable_stream(handle, r) for r in requests]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
    failed = [f for f in firsts if isinstance(f, BaseException)]
    if failed:
        for s in streams:
            await s.aclose()
        raise engine_error(failed[0]) from None
    return Opened(streams, list(firsts))


async def without_empty_chunks(
    chunks: AsyncIterator[tuple[int, TokenChunk]],
) -> AsyncIterator[tuple[int, list[TokenChunk]]]:
    """Groups each choice's tokens until one carries text or a finish reason (a partial UTF-8 character
    or a pending stop string has no text yet), so that no chunk the client sees is empty."""
    pending: dict[int, list[TokenChunk]] = {}
    async for index, chunk in chunks:
        pending.setdefault(index, []).append(chunk)
        if chunk.text or chunk.finish_reason:
            yield index, pending.pop(index)
