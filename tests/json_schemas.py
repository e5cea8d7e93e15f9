"""Twenty JSON schemas for structured-output tests: nested objects, bounded arrays, enums, number ranges,
required and optional keys. Strings are bounded so that a random model's output ends within the test's
max_tokens (a string's closing quote is one allowed token among hundreds)."""

from __future__ import annotations

S = {"type": "string", "maxLength": 6}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"a": S}, "required": ["a"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {
        "type": "object",
        "properties": {
            "xs": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["xs"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "inner": {
                "type": "object",
                "properties": {"b": S},
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["inner"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": S, "b": {"type": "integer", "minimum": 1, "maximum": 3}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"v": {"type": "null"}},
        "required": ["v"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"k": {"const": "fixed"}},
        "required": ["k"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}, "mode": {"enum": ["on", "off"]}},
        "required": ["level", "mode"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "pts": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": 0, "maximum": 9},
                        "y": {"type": "integer", "minimum": 0, "maximum": 9},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["pts"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[a-c]{2}[0-9]$"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}
        },
        "required": ["value"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"enum": [1, 2]}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"word": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["word"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"pair": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}},
        "required": ["pair"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "opt1": {"type": "boolean"},
            "opt2": {"enum": ["a"]},
            "req": {"type": "integer", "minimum": 5, "maximum": 7},
        },
        "required": ["req"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "error"]},
            "detail": {
                "type": "object",
                "properties": {"code": {"type": "integer", "minimum": 100, "maximum": 599}},
                "required": ["code"],
                "additionalProperties": False,
            },
        },
        "required": ["status", "detail"],
        "additionalProperties": False,
    },
]
