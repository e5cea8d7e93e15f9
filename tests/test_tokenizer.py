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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call-1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call-2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Lyon"}},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    {"role": "tool", "tool_call_id": "call-2", "content": "rain, 14 C"},
]


def _render(tok: Tokenizer, messages: list[dict], **kwargs) -> str:
    return tok._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def test_chat_template_carries_tools_calls_and_results(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    text = _render(tok, TOOL_CONVERSATION, tools=[WEATHER_TOOL])

    system = text.split(demo.IM_END_TOKEN)[0]
    assert system.startswith(demo.BOS_TOKEN + "<|im_start|>system\nYou are helpful.")
    tools_block = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == [WEATHER_TOOL["function"]]

    calls = [json.loads(c.split("</tool_call>")[0]) for c in text.split("<tool_call>\n")[2:]]
    assert calls == [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Lyon"}},
    ]
    # consecutive tool results share one user turn, in order
    results_turn = text.split("<|im_start|>user\n")[-1].split(demo.IM_END_TOKEN)[0]
    assert results_turn == (
        "<tool_response>\nsunny, 21 C\n</tool_response>\n<tool_response>\nrain, 14 C\n</tool_response>"
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_reasoning_and_thinking_prompt(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    answered = [*MESSAGES, {"role": "assistant", "content": "Paris.", "reasoning_content": "A capital."}]
    text = _render(tok, [*answered, {"role": "user", "content": "Sure?"}], enable_thinking=True)
    assert "<|im_start|>assistant\n<think>\nA capital.\n</think>\n\nParis.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert _render(tok, MESSAGES).endswith("<|im_start|>assistant\n")


def test_tool_tags_are_single_tokens_that_decoding_keeps(model_dir: Path) -> None:
    tok = Tokenizer.from_model_dir(model_dir)
    text = '<think>\nweather\n</think>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = tok.encode(text)
    for tag in demo.TOOL_TOKENS[:2] + demo.TOOL_TOKENS[4:]:
        assert _id(tok, tag) in ids
    assert tok.decode(ids) == text
