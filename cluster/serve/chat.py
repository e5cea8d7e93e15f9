"""POST /v1/chat/completions: messages (and tools) through the chat template, message and delta shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cluster.serve.choices import CachedTokens, Opened, sampling, usage, without_empty_chunks
from cluster.serve.messages import GenerateRequest, JsonOutput, TokenChunk
from cluster.serve.protocol import ChatCompletionRequest
from cluster.serve.streaming import collect, merge
from cluster.serve.tools.forced import forced_calls_schema
from cluster.serve.tools.output import OutputReader, message
from cluster.serve.tools.schema import forced_functions


def _json_output(body: ChatCompletionRequest) -> JsonOutput | None:
    forced = forced_functions(body.tools, body.tool_choice)
    if forced is not None:
        return JsonOutput(forced_calls_schema(forced, body.parallel_tool_calls))
    return body.json_output()


def chat_requests(body: ChatCompletionRequest) -> list[GenerateRequest]:
    messages = [m.template_dict(f"messages.{i}") for i, m in enumerate(body.messages)]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    json_output, tools = _json_output(body), body.tool_dicts()
    return [
        GenerateRequest(
            sampling(body, body.max_new_tokens(), logprobs, i),
            messages=messages,
            stop=body.stop_list(),
            json_output=json_output,
            tools=tools,
        )
        for i in range(body.n)
    ]


def output_reader(body: ChatCompletionRequest, parser: str) -> OutputReader:
    forced = forced_functions(body.tools, body.tool_choice) is not None
    return OutputReader(parser, body.tool_dicts() is not None, forced)


def _logprobs(chunks: list[TokenChunk]) -> dict[str, list[dict]]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in (c.logprobs for c in chunks)
        if lp is not None
    ]
    return {"content": content}


def cached_of(choices: list[list[TokenChunk]]) -> int:
    """The prompt tokens the prefix cache supplied: one prompt, so its first choice's count."""
    return choices[0][0].cached_tokens if choices and choices[0] else 0


async def chat_response(
    body: ChatCompletionRequest, opened: Opened, shape: dict[str, Any], parser: str
) -> dict:
    choices, used = await collect(opened.streams)
    out = []
    for i, chunks in enumerate(choices):
        reader = output_reader(body, parser)
        deltas = reader.feed("".join(c.text for c in chunks)) + reader.finish()
        choice = {
            "index": i,
            "finish_reason": reader.finish_reason(chunks[-1].finish_reason),
            "message": message(reader, deltas),
            "logprobs": _logprobs(chunks) if body.logprobs else None,
        }
        out.append(choice)
    return {
        **shape,
        "object": "chat.completion",
        "choices": out,
        "usage": usage(opened.accepted[0].prompt_tokens, used, cached_of(choices)),
    }


async def chat_chunks(
    body: ChatCompletionRequest, opened: Opened, shape: dict[str, Any], parser: str
) -> AsyncIterator[dict]:
    frame = {**shape, "object": "chat.completion.chunk"}
    readers = [output_reader(body, parser) for _ in range(body.n)]
    held: dict[int, list[TokenChunk]] = {}  # tokens whose text the parser holds (logprobs go with it later)
    for index in range(body.n):
        start = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**frame, "choices": [start]}
    used, cached = 0, CachedTokens(body.n)
    async for index, new in without_empty_chunks(merge(opened.streams)):
        used += len(new)
        cached.see(index, new)
        reader, finish = readers[index], new[-1].finish_reason
        deltas = reader.feed("".join(c.text for c in new)) + (reader.finish() if finish else [])
        chunks = held.pop(index, []) + new  # the reader has seen the held text already
        if not deltas and not finish:
            held[index] = chunks
            continue
        deltas = deltas or [{}]  # a finish with nothing left to say
        for n, delta in enumerate(deltas):
            last = n == len(deltas) - 1
            choice = {
                "index": index,
                "delta": delta,
                "finish_reason": reader.finish_reason(finish) if last else None,
                "logprobs": _logprobs(chunks) if body.logprobs and n == 0 else None,
            }
            yield {**frame, "choices": [choice]}
    if body.include_usage():
        yield {**frame, "choices": [], "usage": usage(opened.accepted[0].prompt_tokens, used, cached.total())}
