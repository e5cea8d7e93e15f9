import json
from pathlib import Path

import pytest

from cluster import demo
from router.tokenizer import Tokenizer

MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.write_afmoe_checkpoint(tmp_path_factory.mktemp("model"), {"num_hidden_layers": 2})


def _id(tokenizer: Tokenizer, token: str) -> int:
    return tokenizer._tok.convert_tokens_to_ids(token)


def test_round_trip(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    text = "The quick brown fox jumps over the lazy dog, twice!"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_sizes_and_special_ids(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    assert tok.vocab_size == demo.DEMO_TOKENIZER_VOCAB_SIZE
    assert tok.bos_token_id == _id(tok, demo.BOS_TOKEN)
    assert tok.eos_token_ids == [_id(tok, demo.EOS_TOKEN), _id(tok, demo.IM_END_TOKEN)]


def test_chat_template_ends_with_generation_prompt(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    assert tok.has_chat_template
    ids = tok.apply_chat_template(MESSAGES)
    assert ids.count(tok.bos_token_id) == 1
    assert ids.count(_id(tok, demo.IM_START_TOKEN)) == 3
    text = tok._tok.decode(ids)
    assert text.startswith(demo.BOS_TOKEN + demo.IM_START_TOKEN + "system\nYou are helpful.")
    assert text.endswith("<|im_start|>assistant\n")


def test_fallback_template_without_chat_template(model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    tok = Tokenizer.from_model_dir(tmp_path)
    assert not tok.has_chat_template
    ids = tok.apply_chat_template(MESSAGES)
    assert ids[0] == tok.bos_token_id
    expected = "system: You are helpful.\nuser: What is the capital of France?\nassistant:"
    assert tok.decode(ids) == expected


def test_eos_ids_merge_config_and_generation_config(model_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3, 4]}))

    assert Tokenizer.from_model_dir(tmp_path).eos_token_ids == [1, 3, 4]


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    demo.write_afmoe_checkpoint(tmp_path, {"num_hidden_layers": 2}, tokenizer=False)
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_model_dir(tmp_path)
