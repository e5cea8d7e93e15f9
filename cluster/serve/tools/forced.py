"""tool_choice "required" or a named function: the output is constrained to a JSON array of calls.

As in vLLM, the grammar is the JSON schema of `[{"name": <a tool>, "arguments": <its parameters>}, ...]`,
so every call names a given tool and its arguments validate against that tool's parameters.
"""

from __future__ import annotations

import json

from cluster.serve.tools.parsers import ToolCall

MAX_PARALLEL_CALLS = 4


def _call_schema(function: dict) -> dict:
    return {
        "type": "object",
        "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_calls_schema(functions: list[dict], parallel: bool) -> dict:
    """functions: the `function` objects of the tools the model may call."""
    calls = [_call_schema(f) for f in functions]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"type": "array", "items": items, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}


def parse_forced(text: str) -> list[ToolCall]:
    """The calls of a constrained output; [] if it was cut short (finish_reason length)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [ToolCall(c["name"], json.dumps(c["arguments"])) for c in calls]
