"""POST /v1/responses (text, streaming, function tools), served by the chat pipeline.

A Responses body is rewritten as a chat request (input items become messages, function tools become chat
tools), so that validation, the chat template, tool parsing and grammars are the chat endpoint's own.
Not served: previous_response_id and stored responses (a 400 naming the field), built-in tools.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from cluster.serve.chat import output_reader
from cluster.serve.choices import Opened
from cluster.serve.protocol import ChatCompletionRequest, Number, error_from_validation, now
from cluster.serve.streaming import collect, merge
from cluster.serve.tools.output import OutputReader
from cluster.serve.tools.parsers import ToolCall
from cluster.serve.tools.schema import FunctionDef, FunctionName


class TextContent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["input_text", "output_text"]
    text: StrictStr


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextContent]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id/status echo back what this server sent

    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr


class FunctionTool(FunctionDef):
    """Responses' flat tool: the chat function's fields beside the type."""

    type: Literal["function"]


class NamedFunction(FunctionName):
    type: Literal["function"]


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    input: StrictStr | list[MessageItem | FunctionCallItem | FunctionCallOutputItem] = Field(
        ..., min_length=1
    )
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    stream: StrictBool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool = True

    def _messages(self) -> list[dict]:
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {
                    "id": item.call_id,
                    "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments},
                }
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def as_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (validated, and checked, as the chat endpoint does)."""
        choice: Any = self.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        tools = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in self.tools or []
        ]
        try:
            chat = ChatCompletionRequest.model_validate(
                {
                    "model": self.model,
                    "messages": self._messages(),
                    "max_tokens": self.max_output_tokens,
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                    "stream": self.stream,
                    "tools": tools or None,
                    "tool_choice": choice,
                    "parallel_tool_calls": self.parallel_tool_calls,
                }
            )
        except ValidationError as err:
            raise error_from_validation(list(err.errors())) from None
        chat.check()
        return chat


def _message_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall) -> dict:
    return {
        "type": "function_call",
        "id": f"fc_{call.id}",
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": "completed",
    }


def _response(shape: dict, output: list[dict], status: str, usage: dict | None) -> dict:
    return {**shape, "object": "response", "status": status, "output": output, "usage": usage}


def _usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def responses_shape(body: ResponsesRequest, model: str) -> dict:
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "created_at": now(),
        "model": model,
        "tool_choice": body.tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "parallel_tool_calls": body.parallel_tool_calls,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "instructions": body.instructions,
    }


def _output(reader: OutputReader, deltas: list[dict]) -> list[dict]:
    content = "".join(d.get("content", "") for d in deltas)
    output = (
        [_message_item(f"msg_{uuid.uuid4().hex}", content, "completed")]
        if content.strip() or not reader.calls
        else []
    )
    return output + [_call_item(c) for c in reader.calls]


async def responses_response(chat: ChatCompletionRequest, opened: Opened, shape: dict, parser: str) -> dict:
    [chunks], used = await collect(opened.streams)
    reader = output_reader(chat, parser)
    deltas = reader.feed("".join(c.text for c in chunks)) + reader.finish()
    status = "incomplete" if chunks[-1].finish_reason == "length" else "completed"
    return _response(shape, _output(reader, deltas), status, _usage(opened.accepted[0].prompt_tokens, used))


async def responses_events(
    chat: ChatCompletionRequest, opened: Opened, shape: dict, parser: str
) -> AsyncIterator[dict]:
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields: Any) -> dict:
        return {"type": kind, "sequence_number": next(sequence), **fields}

    yield event("response.created", response=_response(shape, [], "in_progress", None))
    reader = output_reader(chat, parser)
    item_id, text, used, finish, opened_item = f"msg_{uuid.uuid4().hex}", "", 0, None, False
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    async for _, chunk in merge(opened.streams):
        used += 1
        finish = chunk.finish_reason
        deltas = reader.feed(chunk.text) + (reader.finish() if finish else [])
        piece = "".join(d.get("content", "") for d in deltas)
        if not piece:
            continue
        if not opened_item:
            opened_item = True
            yield event(
                "response.output_item.added", output_index=0, item=_message_item(item_id, "", "in_progress")
            )
            yield event(
                "response.content_part.added",
                **where,
                part={"type": "output_text", "text": "", "annotations": []},
            )
        text += piece
        yield event("response.output_text.delta", **where, delta=piece)
    output = []
    if opened_item:
        yield event("response.output_text.done", **where, text=text)
        part = {"type": "output_text", "text": text, "annotations": []}
        yield event("response.content_part.done", **where, part=part)
        output.append(_message_item(item_id, text, "completed"))
        yield event("response.output_item.done", output_index=0, item=output[-1])
    for call in reader.calls:
        item = _call_item(call)
        index = len(output)
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "arguments": "", "status": "in_progress"},
        )
        yield event(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=index,
            delta=call.arguments,
        )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            arguments=call.arguments,
        )
        output.append(item)
        yield event("response.output_item.done", output_index=index, item=item)
    status = "incomplete" if finish == "length" else "completed"
    final = _response(shape, output, status, _usage(opened.accepted[0].prompt_tokens, used))
    yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
