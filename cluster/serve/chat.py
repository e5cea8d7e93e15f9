"""POST /v1/chat/completions: messages through the chat template, message and delta shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from cluster.serve.choices import Opened, sampling, usage, without_empty_chunks
from cluster.serve.messages import GenerateRequest, JsonOutput, TokenChunk
from cluster.serve.protocol import ChatCompletionRequest
from cluster.serve.streaming import collect, merge


def chat_requests(body: ChatCompletionRequest) -> list[GenerateRequest]:
    messages = [m.template_dict() for m in body.messages]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    form = body.response_format
    json_output = JsonOutput(form.schema()) if form is not None and form.type != "text" else None
    return [
        GenerateRequest(
            sampling(body, body.max_new_tokens(), logprobs, i),
            messages=messages,
            stop=body.stop_list(),
            json_output=json_output,
        )
        for i in range(body.n)
    ]


def _logprobs(chunks: list[TokenChunk]) -> dict[str, list[dict]]:
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in (c.logprobs for c in chunks)
        if lp is not None
    ]
    return {"content": content}


async def chat_response(body: ChatCompletionRequest, opened: Opened, shape: dict[str, Any]) -> dict:
    choices, used = await collect(opened.streams)
    return {
        **shape,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "finish_reason": chunks[-1].finish_reason,
                "message": {"role": "assistant", "content": "".join(c.text for c in chunks)},
                "logprobs": _logprobs(chunks) if body.logprobs else None,
            }
            for i, chunks in enumerate(choices)
        ],
        "usage": usage(opened.accepted[0].prompt_tokens, used),
    }


async def chat_chunks(
    body: ChatCompletionRequest, opened: Opened, shape: dict[str, Any]
) -> AsyncIterator[dict]:
    frame = {**shape, "object": "chat.completion.chunk"}
    for index in range(body.n):
        start = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**frame, "choices": [start]}
    used = 0
    async for index, chunks in without_empty_chunks(merge(opened.streams)):
        used += len(chunks)
        text = "".join(c.text for c in chunks)
        choice = {
            "index": index,
            "delta": {"content": text} if text else {},
            "finish_reason": chunks[-1].finish_reason,
            "logprobs": _logprobs(chunks) if body.logprobs else None,
        }
        yield {**frame, "choices": [choice]}
    if body.include_usage():
        yield {**frame, "choices": [], "usage": usage(opened.accepted[0].prompt_tokens, used)}
