"""Reading tool calls and reasoning out of a model's text, whole or as it streams.

Formats: `hermes` (Qwen/Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and `trinity`
(the same calls, after reasoning between `<think>` and `</think>`, which goes to reasoning_content).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARSERS = ("hermes", "trinity")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def wire(self, index: int | None = None) -> dict:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return out if index is None else {"index": index, **out}


def call_from_json(text: str) -> ToolCall | None:
    """A call from `{"name": ..., "arguments": ...}`; None if the text is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ToolCall(value["name"], arguments if isinstance(arguments, str) else json.dumps(arguments))


def _pending_prefix(text: str, tag: str) -> int:
    """How many trailing characters of text could begin `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class StreamParser:
    """Feed text pieces; get OpenAI delta fields ({"content"}, {"reasoning_content"}, {"tool_calls"}).

    Text that might start a tag is held until it is known not to; a call is sent whole once closed.
    `finish()` flushes what is held (an unclosed call stays content, as the model wrote it).
    """

    def __init__(self, parser: str, tools: bool) -> None:
        self.tools = tools
        self.state = "think?" if parser == "trinity" else "content"
        self.buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        out: list[dict] = []
        while True:
            step = self._step()
            if step is None:
                return out
            if step:
                out.append(step)

    def _step(self) -> dict | None:
        """One move of the state machine over the buffer: a delta, {} (moved, nothing to send), or None."""
        if self.state == "think?":
            stripped = self.buffer.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.buffer, self.state = stripped[len(THINK_OPEN) :], "think"
                return {}
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return None
            self.state = "content"
            return {}
        if self.state == "think":
            return self._until(THINK_CLOSE, "reasoning_content", "content")
        if self.state == "content":
            if not self.tools:
                return self._emit("content", len(self.buffer)) if self.buffer else None
            return self._until(CALL_OPEN, "content", "call")
        end = self.buffer.find(CALL_CLOSE)
        if end < 0:
            return None
        call = call_from_json(self.buffer[:end].strip())
        self.buffer, self.state = self.buffer[end + len(CALL_CLOSE) :], "content"
        if call is None:
            return {}
        self.calls.append(call)
        return {"tool_calls": [call.wire(len(self.calls) - 1)]}

    def _until(self, tag: str, kind: str, after: str) -> dict | None:
        at = self.buffer.find(tag)
        if at >= 0:
            text = self.buffer[:at]
            self.buffer, self.state = self.buffer[at + len(tag) :], after
            return {kind: text} if text else {}
        keep = _pending_prefix(self.buffer, tag)
        return self._emit(kind, len(self.buffer) - keep) if len(self.buffer) > keep else None

    def _emit(self, kind: str, n: int) -> dict:
        text, self.buffer = self.buffer[:n], self.buffer[n:]
        return {kind: text}

    def finish(self) -> list[dict]:
        held, self.buffer = self.buffer, ""
        if self.state == "call":
            held = CALL_OPEN + held
        kind = "reasoning_content" if self.state == "think" else "content"
        return [{kind: held}] if held else []
