"""Text in, token ids out: a checkpoint's own tokenizer and chat template."""

import json
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def _config_ids(path: Path) -> list[int]:
    """eos_token_id from a config file: absent, an int or a list of ints."""
    if not path.is_file():
        return []
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class Tokenizer:
    """The checkpoint's tokenizer and chat template, loaded from local files only."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, extra_eos_token_ids: list[int]) -> None:
        self._tok = hf_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        eos = [hf_tokenizer.eos_token_id, *extra_eos_token_ids]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in eos if i is not None))
        self.has_chat_template: bool = hf_tokenizer.chat_template is not None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load tokenizer.json and friends; the end-of-sequence ids also come from the model's configs."""
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ValueError(f"no tokenizer in {model_dir}: tokenizer.json is missing")
        hf_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # generate() stops on generation_config's eos ids, which may list more than config.json's.
        eos = _config_ids(model_dir / "config.json") + _config_ids(model_dir / "generation_config.json")
        return cls(hf_tokenizer, eos)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The transformers tokenizer (what grammar engines build their token tables from)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for a conversation, ending where the assistant's reply starts."""
        if self.has_chat_template:
            # The template writes its own special tokens (bos included), so none are added on top.
            text = self._tok.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False
            )
            return self._tok.encode(text, add_special_tokens=False)
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(lines + "assistant:")
