"""Turning what a caller sends (text, token ids, chat messages) into prompt token ids, in one place.

Every entry point (Engine, batch jobs, the Serve deployment) goes through `PromptEncoder`, so a bad
prompt is the same InvalidRequest (an HTTP 400) whichever way it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from router.errors import InvalidRequest
from router.tokenizer import Tokenizer

Message = dict
Prompt = str | list[int]


def is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


class PromptEncoder:
    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        has_tokenizer = (model_path / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_model_dir(model_path) if has_tokenizer else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer and self.tokenizer.has_chat_template)

    def encode(self, prompt: Prompt | list[Message], tools: list[dict] | None = None) -> list[int]:
        if is_chat(prompt):
            return self.chat(prompt, tools)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"{self.model_path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise InvalidRequest("a token-id prompt must be a list of integers")
        return list(prompt)

    def chat(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer, so chat messages are not available")
        try:
            return self.tokenizer.apply_chat_template(messages, tools)
        except Exception as err:  # the template's own checks (jinja errors) reject the conversation
            raise InvalidRequest(f"chat template failed: {err}") from None

    def decode(self, token_ids: Sequence[int]) -> str | None:
        return self.tokenizer.decode(list(token_ids)) if self.tokenizer else None
