"""OpenAI wire format: request bodies as validated models, error bodies, response builders."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)

from cluster.serve.messages import JsonOutput
from cluster.serve.openai_error import OpenAIError
from cluster.serve.tools.schema import NamedToolChoice, Tool, ToolCallIn, ToolChoice, check_tools

__all__ = ["NamedToolChoice", "OpenAIError", "Tool"]

MAX_N = 16
MAX_STOP = 4


def _number(value: Any) -> Any:
    """JSON numbers only: "0.5" and true are errors, not 0.5 and 1.0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
MAX_TOP_K = 1 << 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr = Field(..., min_length=1, max_length=64)
    description: StrictStr | None = None
    json_schema: dict[str, Any] = Field(..., alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def check(self) -> None:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise OpenAIError(
                400,
                "response_format.json_schema is required with type json_schema, and only then",
                param="response_format.json_schema",
            )
        if self.json_schema is not None:
            schema = self.json_schema.json_schema
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as err:
                raise OpenAIError(
                    400,
                    f"response_format.json_schema.schema is not a valid JSON schema: {err.message}",
                    param="response_format.json_schema.schema",
                ) from None


class SamplingFields(BaseModel):
    """Fields both endpoints share; types are strict so that "1" is not silently a number.

    A field that is not declared here is a 400 naming it (docs/api.md lists what is served).
    """

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(
        0, ge=0, le=MAX_TOP_K, description="extension: sample from the k most likely tokens"
    )
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: Number = Field(1.0, gt=0.0, le=2.0, description="extension, as in vLLM")
    logit_bias: dict[str, Number] | None = None
    min_tokens: StrictInt = Field(0, ge=0, description="extension, as in vLLM")
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(None, max_length=64)
    ignore_eos: StrictBool = False
    user: StrictStr | None = None  # accepted for compatibility; not used
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"values must be within -100..100, got {value} for {key}")
        return bias

    def check(self) -> None:
        """What the schema alone cannot say."""
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.response_format is not None:
            self.response_format.check()

    def json_output(self) -> JsonOutput | None:
        """What response_format constrains the output to (None: free text)."""
        form = self.response_format
        if form is None or form.type == "text":
            return None
        return JsonOutput(form.json_schema.json_schema if form.json_schema is not None else None)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return stop

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


MAX_PROMPTS = 32
TokenIds = list[StrictInt]


class CompletionRequest(SamplingFields):
    prompt: StrictStr | TokenIds | list[StrictStr] | list[TokenIds] = Field(
        ..., description="text, token ids, or a list of either (one choice per prompt)"
    )
    max_tokens: StrictInt | None = Field(16, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt: str | list) -> str | list:
        if isinstance(prompt, list) and len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; `[]` stays one (empty, refused) token-id prompt."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: StrictStr | None = None  # tool messages

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self, where: str) -> dict[str, Any]:
        """The message as the chat template reads it; `where` names it in errors (messages.<i>)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                c.template_dict(f"{where}.tool_calls.{i}") for i, c in enumerate(self.tool_calls)
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def check_tool_turns(messages: list[ChatMessage]) -> None:
    """Tool calls only on assistant messages; each tool message answers a call made before it."""
    called: set[str] = set()
    for i, message in enumerate(messages):
        if message.tool_calls and message.role != "assistant":
            raise OpenAIError(
                400, "only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls"
            )
        called.update(c.id for c in message.tool_calls or ())
        if message.role == "tool" and message.tool_call_id not in called:
            raise OpenAIError(
                400,
                f"messages.{i} is a tool result whose tool_call_id ({message.tool_call_id!r}) matches no "
                "earlier assistant tool call",
                param=f"messages.{i}.tool_call_id",
            )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def check(self) -> None:
        super().check()
        check_tool_turns(self.messages)
        check_tools(self.tools, self.tool_choice)
        if self.json_output() is not None and self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError(
                400, "response_format and a forced tool_choice exclude each other", param="response_format"
            )

    def tool_dicts(self) -> list[dict] | None:
        """The tools as chat templates read them (None: no tools, or tool_choice none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def error_from_validation(errors: list[dict[str, Any]]) -> OpenAIError:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "request body is not valid JSON", code="invalid_json")
    if first.get("type") in ("model_attributes_type", "dict_type") and not loc:
        return OpenAIError(400, "request body must be a JSON object", code="invalid_body")
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"unsupported parameter: {param}", param=param, code="unsupported_parameter")
    where = f" ({param})" if param else ""
    return OpenAIError(400, f"invalid request{where}: {first.get('msg', 'invalid value')}", param=param)


def now() -> int:
    return int(time.time())
