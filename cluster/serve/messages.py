"""What the ingress and the engine deployment send each other through Serve's handle: typed, torch-free.

The ingress builds a GenerateRequest per choice; the deployment's `generate` streams back one Accepted
(once the engine admitted the request) and then one TokenChunk per generated token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Sampling:
    """The sampling fields of one choice, as the API validated them (router.sampling checks them again)."""

    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Resume:
    """A stream a lost replica was serving: its prompt, the tokens the client has, the text already sent."""

    prompt_ids: list[int]
    output_ids: list[int]
    sent_chars: int


@dataclass(frozen=True)
class JsonOutput:
    """The output must be JSON matching `schema` (None: any JSON object)."""

    schema: dict | None = None


@dataclass(frozen=True)
class GenerateRequest:
    sampling: Sampling
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None  # chat messages through the model's chat template
    stop: list[str] = field(default_factory=list)
    resume: Resume | None = None
    echo: bool = False  # Accepted carries the prompt's text
    json_output: JsonOutput | None = None
    tools: list[dict] | None = None  # for the chat template

    def resumed(self, resume: Resume) -> GenerateRequest:
        return replace(self, resume=resume)


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int
    prompt_ids: list[int]
    prompt_text: str | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class TokenChunk:
    text: str  # the text this token completes (may be empty while a character or stop string is pending)
    token_id: int
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache for this choice


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int
    has_chat_template: bool
