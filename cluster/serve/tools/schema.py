"""The request side of tool calling: tools, tool_choice, and the tool calls of earlier turns."""

from __future__ import annotations

import json
from typing import Any, Generic, Literal, TypeVar

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from cluster.serve.openai_error import OpenAIError

MAX_TOOLS = 128


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(..., pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr


F = TypeVar("F", bound=BaseModel)


class Function(BaseModel, Generic[F]):
    """`{"type": "function", "function": ...}`: a tool (FunctionDef) or a named tool_choice (FunctionName)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: F


Tool = Function[FunctionDef]
NamedToolChoice = Function[FunctionName]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr
    arguments: StrictStr


class ToolCallIn(BaseModel):
    """A call an assistant message made in an earlier turn."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self, where: str) -> dict[str, Any]:
        """As chat templates read it: arguments as an object (templates serialise them themselves)."""
        try:
            arguments = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            raise OpenAIError(400, f"{where}.function.arguments is not JSON", param=where) from None
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def check_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    if tools is None:
        if choice is not None and choice != "none":
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        return
    if len(tools) > MAX_TOOLS:
        raise OpenAIError(400, f"at most {MAX_TOOLS} tools", param="tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise OpenAIError(400, "tool function names must be unique", param="tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None:
            try:
                jsonschema.validators.validator_for(tool.function.parameters).check_schema(
                    tool.function.parameters
                )
            except jsonschema.SchemaError as err:
                where = f"tools.{i}.function.parameters"
                raise OpenAIError(
                    400, f"{where} is not a valid JSON schema: {err.message}", param=where
                ) from None
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise OpenAIError(
            400,
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            param="tool_choice",
        )


def forced_functions(tools: list[Tool] | None, choice: ToolChoice | None) -> list[dict] | None:
    """The functions a call is forced among (required: all; named: that one); None when not forced."""
    if not tools or choice in (None, "none", "auto"):
        return None
    functions = [t.function.model_dump(exclude_none=True) for t in tools]
    if isinstance(choice, NamedToolChoice):
        return [f for f in functions if f["name"] == choice.function.name]
    return functions
