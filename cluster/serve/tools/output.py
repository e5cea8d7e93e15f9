"""One choice's output as OpenAI message fields: content, reasoning_content, tool_calls, whole or streamed."""

from __future__ import annotations

from cluster.serve.tools.forced import parse_forced
from cluster.serve.tools.parsers import StreamParser, ToolCall


class OutputReader:
    """`forced`: the output is a constrained JSON array of calls (tool_choice required or named)."""

    def __init__(self, parser: str, tools: bool, forced: bool) -> None:
        self.forced = forced
        self.stream = StreamParser(parser, tools and not forced)
        self.held = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[dict]:
        if self.forced:
            self.held += text
            return []
        deltas = self.stream.feed(text)
        self.calls = self.stream.calls
        return deltas

    def finish(self) -> list[dict]:
        if not self.forced:
            return self.stream.finish()
        self.calls = parse_forced(self.held)
        if self.calls:
            return [{"tool_calls": [c.wire(i) for i, c in enumerate(self.calls)]}]
        return [{"content": self.held}] if self.held else []  # cut short: what the model wrote

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls and reason == "stop" else reason


def message(reader: OutputReader, deltas: list[dict]) -> dict:
    """The non-streamed message from all of a choice's deltas."""
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    out: dict = {"role": "assistant", "content": content}
    if reader.calls:
        out["content"] = content if content.strip() else None
        out["tool_calls"] = [c.wire() for c in reader.calls]
    if reasoning:
        out["reasoning_content"] = reasoning
    return out
