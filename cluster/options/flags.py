"""Command-line flags generated from EngineOptions: `expert_shards` is `--expert-shards`, and so on.

A flag left out is None and falls back to the option's own default (or to a --config file's value).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from cluster.options.engine import EngineOptions


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _kind(field: FieldInfo) -> tuple[Any, tuple[str, ...] | None]:
    """(argparse type, choices) for a field's annotation: Literal, bool, int, float, str or X | None."""
    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, tuple(typing.get_args(annotation))
    return annotation, None


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options")
    for name, field in EngineOptions.model_fields.items():
        kind, choices = _kind(field)
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or name} (default: {default})"
        if kind is bool:
            group.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag_name(name), type=kind, choices=choices, help=help_text)


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line (those not given are left out)."""
    return {
        name: getattr(args, name)
        for name in EngineOptions.model_fields
        if getattr(args, name, None) is not None
    }
