"""POST /v1/completions: one choice per (prompt, n), echo, logprobs with text offsets, SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cluster.serve.choices import CachedTokens, Opened, sampling, usage, without_empty_chunks
from cluster.serve.messages import GenerateRequest, TokenChunk
from cluster.serve.protocol import CompletionRequest
from cluster.serve.streaming import collect, merge


def completion_requests(body: CompletionRequest) -> list[GenerateRequest]:
    """Choice p * n + j is prompt p's j-th sample."""
    json_output = body.json_output()
    return [
        GenerateRequest(
            sampling(body, body.max_tokens, body.logprobs, j),
            prompt=prompt,
            stop=body.stop_list(),
            echo=body.echo,
            json_output=json_output,
        )
        for prompt in body.prompts()
        for j in range(body.n)
    ]


def prompt_tokens(opened: Opened, n: int) -> int:
    """Each prompt counts once, however many choices it has."""
    return sum(a.prompt_tokens for a in opened.accepted[::n])


def _logprobs(chunks: list[TokenChunk], offset: int) -> dict[str, list]:
    """The chunks' logprobs; `offset` is where the first one's text starts in the choice's text.

    top_logprobs always holds the sampled token too, so an entry has up to logprobs + 1 tokens.
    """
    entries: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        if chunk.logprobs is not None:
            lp = chunk.logprobs
            entries["tokens"].append(lp.token)
            entries["token_logprobs"].append(lp.logprob)
            entries["top_logprobs"].append({**dict(lp.top), lp.token: lp.logprob})
            entries["text_offset"].append(offset)
        offset += len(chunk.text)
    return entries


def _echo(opened: Opened, index: int, echo: bool) -> str:
    return (opened.accepted[index].prompt_text or "") if echo else ""


async def completion_response(body: CompletionRequest, opened: Opened, shape: dict[str, Any]) -> dict:
    choices, used = await collect(opened.streams)
    out = []
    for i, chunks in enumerate(choices):
        echoed = _echo(opened, i, body.echo)
        choice = {
            "index": i,
            "text": echoed + "".join(c.text for c in chunks),
            "finish_reason": chunks[-1].finish_reason,
            "logprobs": _logprobs(chunks, len(echoed)) if body.logprobs is not None else None,
        }
        out.append(choice)
    cached = CachedTokens(body.n)
    for i, chunks in enumerate(choices):
        cached.see(i, chunks)
    return {**shape, "choices": out, "usage": usage(prompt_tokens(opened, body.n), used, cached.total())}


async def completion_chunks(
    body: CompletionRequest, opened: Opened, shape: dict[str, Any]
) -> AsyncIterator[dict]:
    offsets = [0] * len(opened.streams)
    if body.echo:
        for i in range(len(opened.streams)):
            echoed = _echo(opened, i, True)
            offsets[i] = len(echoed)
            yield {
                **shape,
                "choices": [{"index": i, "text": echoed, "finish_reason": None, "logprobs": None}],
            }
    used, cached = 0, CachedTokens(body.n)
    async for index, chunks in without_empty_chunks(merge(opened.streams)):
        used += len(chunks)
        cached.see(index, chunks)
        choice = {
            "index": index,
            "text": "".join(c.text for c in chunks),
            "finish_reason": chunks[-1].finish_reason,
            "logprobs": _logprobs(chunks, offsets[index]) if body.logprobs is not None else None,
        }
        offsets[index] += len(choice["text"])
        yield {**shape, "choices": [choice]}
    if body.include_usage():
        yield {**shape, "choices": [], "usage": usage(prompt_tokens(opened, body.n), used, cached.total())}
