"""A batch record: its request (prompt or chat messages, sampling fields) or the error it gets instead."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from router.sampling import SamplingParams

Record = dict[str, Any]
Prompt = str | list[int] | list[dict]

# Per-record sampling fields and whether each must be an integer (else any finite number).
PARAM_FIELDS = {"max_tokens": True, "temperature": False, "top_p": False, "seed": True}


class RecordError(ValueError):
    """A record that cannot be processed as given; the message goes to its error row."""


@dataclass(frozen=True)
class Request:
    row: int
    id: str | int | None
    prompt: Prompt
    params: SamplingParams


def parse_line(row: int, raw: bytes, defaults: SamplingParams) -> Request | Record:
    """The request on a line of a JSONL file, or the error record for it."""
    try:
        record = json.loads(raw)
    except ValueError as err:
        return {"id": None, "row": row, "error": f"not JSON: {err}"}
    return parse_record(row, record, defaults)


def parse_record(row: int, record: Any, defaults: SamplingParams) -> Request | Record:
    """The request in a record (a JSON line, or a row of a Ray Dataset), or the error record for it."""
    if not isinstance(record, dict):
        return {
            "id": None,
            "row": row,
            "error": f"a record must be a JSON object, got {type(record).__name__}",
        }
    record_id = record.get("id")
    try:
        if not (record_id is None or isinstance(record_id, str | int)) or isinstance(record_id, bool):
            raise RecordError(f"'id' must be a string or an integer, got {record_id!r}")
        return Request(row, record_id, _prompt(record), _params(record, defaults))
    except ValueError as err:  # RecordError, or SamplingParams' range checks
        return {"id": record_id, "row": row, "error": str(err)}


def _prompt(record: Record) -> Prompt:
    if ("prompt" in record) == ("messages" in record):
        raise RecordError("a record needs exactly one of 'prompt' and 'messages'")
    if "prompt" in record:
        prompt = record["prompt"]
        if (isinstance(prompt, str) and prompt) or _is_token_ids(prompt):
            return prompt
        raise RecordError("'prompt' must be a non-empty string or a non-empty list of token ids")
    messages = record["messages"]
    if isinstance(messages, list) and messages and all(map(_is_message, messages)):
        return messages
    raise RecordError('\'messages\' must be a non-empty list of {"role": string, "content": string}')


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _params(record: Record, defaults: SamplingParams) -> SamplingParams:
    values = {}
    for name, integer in PARAM_FIELDS.items():
        value = record.get(name)
        if value is None:
            continue
        kinds = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise RecordError(
                f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r}"
            )
        values[name] = value
    return dataclasses.replace(defaults, **values)


def result_record(request: Request, result: Record) -> Record:
    """The result for a request from RouterActor.generate_each's result for it."""
    head = {"id": request.id, "row": request.row}
    if "error" in result:
        return {**head, "error": result["error"]}
    prompt, completion = result["prompt_tokens"], len(result["token_ids"])
    return {
        **head,
        "text": result["text"],
        "token_ids": result["token_ids"],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "finish_reason": result["finish_reason"],
    }
