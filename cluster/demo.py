"""Small but real AFMoE checkpoints, written by transformers itself, for demos and tests."""

import copy
import errno
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN]

DEMO_TOKENIZER_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEMO_CONFIG: dict = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_dense_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "route_scale": 1.0,
    "sliding_window": 64,
    "global_attn_every_n_layers": 3,
    "mup_enabled": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 32768,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
}

DEMO_MODEL_DIRNAME = "demo-model-v2"

# Gate and LM head read RMS-normalised states, so a weight std of SCALE / sqrt(hidden) gives logits with a
# std near SCALE: sigmoid scores clearly apart, and greedy decoding rarely on a near-tie.
GATE_STD_SCALE = 1.0
LM_HEAD_STD_SCALE = 2.0
EXPERT_BIAS_STD = 0.05

_CORPUS = (
    "The harbour town woke slowly. Fishing boats came back before sunrise, and the market opened as soon "
    "as the first crates of fish were carried up the stone steps. Children ran between the stalls, "
    "merchants called out their prices, and an old man sold hot bread from a cart with a green wheel.",
    "A computer program is a list of instructions. The processor reads each instruction, performs a small "
    "operation on numbers held in memory, and moves on to the next one. Modern machines do this billions "
    "of times every second, which is why a simple idea can become a fast and useful tool.",
    "Large language models predict the next word of a text. A mixture of experts model does not use all of "
    "its weights for every word: a small router looks at each token and sends it to a few experts, and "
    "the answers of those experts are added together. Most of the model stays idle for any single token.",
    "When you cook rice, rinse it first, then add water and a pinch of salt. Bring the pot to a boil, turn "
    "the heat down, and cover it with a lid. After twenty minutes the water is gone and the rice is soft. "
    "Let it rest for a few minutes before you serve it with vegetables or beans.",
    "The weather today is cool and clear. In the morning there may be fog near the river, but by noon the "
    "sun will be out and the wind will stay light. Tomorrow clouds will move in from the west, and on "
    "Friday we expect rain for most of the day, so bring an umbrella if you travel.",
    "Question: What is the capital of France? Answer: The capital of France is Paris. Question: How many "
    "days are in a week? Answer: There are seven days in a week. Question: Can you help me write a short "
    "letter to a friend? Answer: Of course, here is a friendly letter you could send.",
    "She opened the door of the library and walked in. The room was quiet, and the light from the tall "
    "windows fell across long tables covered with books, maps and papers. Somewhere a clock was ticking. "
    "She found a chair in the corner, sat down, and began to read the first page.",
)


def _train_demo_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


@functools.cache
def _demo_tokenizer_json() -> str:
    return _train_demo_tokenizer().to_str()


def demo_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The demo byte-level BPE tokenizer with a ChatML chat template; identical on every call."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_demo_tokenizer_json()),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _full_config(config: dict, tokenizer: transformers.PreTrainedTokenizerFast) -> dict:
    defaults = copy.deepcopy(DEMO_CONFIG)
    defaults.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        # A chat turn ends with <|im_end|>, plain text with <|end_of_text|>: both stop generation.
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return {**defaults, **copy.deepcopy(config)}


def _sharpen_decisions(model: transformers.AfmoeForCausalLM, hidden_size: int) -> None:
    """Make routing depend on the token (transformers zeroes gates and expert biases) and widen the logits."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD_SCALE / hidden_size**0.5)
        for name, param in model.named_parameters():
            if name.endswith("mlp.router.gate.weight"):
                param.normal_(0.0, GATE_STD_SCALE / hidden_size**0.5)
            elif name.endswith("mlp.expert_bias"):
                param.normal_(0.0, EXPERT_BIAS_STD)


def _build_model(config: dict, seed: int) -> transformers.AfmoeForCausalLM:
    cfg = transformers.AfmoeConfig(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AfmoeForCausalLM(cfg).to(torch.float32)
        _sharpen_decisions(model, cfg.hidden_size)
    return model.eval()


def write_afmoe_checkpoint(path: str | Path, config: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    """Write a random AfmoeForCausalLM (and the demo tokenizer) to `path` with save_pretrained.

    Keys missing from `config` come from DEMO_CONFIG; vocab_size defaults to the demo tokenizer's size.
    The files are written into a temporary sibling directory and renamed into place, so `path` is either
    absent, empty or complete. FileExistsError if `path` already holds files.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty")
    tok = demo_tokenizer()
    full = _full_config(config, tok)
    if tokenizer and full["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {full['vocab_size']} is smaller than the demo tokenizer's {len(tok)}")
    model = _build_model(full, seed)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        model.save_pretrained(tmp)
        if tokenizer:
            tok.model_max_length = full["max_position_embeddings"]
            tok.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # replaces an empty directory, fails on a non-empty one
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FileExistsError(f"{path} was written by someone else meanwhile") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_demo_model(path: str | Path) -> Path:
    return write_afmoe_checkpoint(path, DEMO_CONFIG)


def demo_model_path() -> Path:
    """The demo model in $MOE_CLUSTER_CACHE (default ~/.cache/moe-cluster), written on first use.

    Safe when processes race: each writes its own temporary copy and only the first rename wins.
    """
    cache = Path(os.environ.get("MOE_CLUSTER_CACHE") or Path.home() / ".cache" / "moe-cluster")
    path = cache / DEMO_MODEL_DIRNAME
    if not (path / "config.json").is_file():
        try:
            write_demo_model(path)
        except FileExistsError:
            if not (path / "config.json").is_file():
                raise
    return path
