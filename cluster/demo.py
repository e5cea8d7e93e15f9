"""The shipped demo model, and small random checkpoints of each served family written by transformers
itself (demo-model --arch, the tests)."""

import copy
import errno
import itertools
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN]

# The shipped demo tokenizer's size: byte-level BPE merges, the special tokens and TOOL_TOKENS.
DEMO_TOKENIZER_VOCAB_SIZE = 2048
# Ordinary added tokens (not special: decoding keeps them, so a tool-call parser sees them in the text).
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

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



@dataclass(frozen=True)
class Family:
    """How to write a random checkpoint of one architecture with transformers."""

    architecture: str
    defaults: dict  # a small config of the family (the demo tokenizer's ids are added)
    gate_suffix: str  # the router's gate weight (transformers initialises it to zeros)
    gate_std_scale: float
    bias_suffix: str | None = None  # a selection bias (a parameter or a buffer), also zeroed by transformers
    # (suffix, std): other parameters drawn from N(0, std), as transformers zeroes or barely sets them
    extra_normal: tuple[tuple[str, float], ...] = ()

    @property
    def model_class(self) -> type:
        return getattr(transformers, self.architecture)

    @property
    def config_class(self) -> type:
        return getattr(transformers, self.architecture.replace("ForCausalLM", "Config"))


_SMALL_LLAMA_LIKE: dict = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts_per_tok": 2,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 32768,
    "initializer_range": 0.05,
    "tie_word_embeddings": False,
}

# `demo-model --arch NAME`: the families a random checkpoint can be written of.
FAMILIES: dict[str, Family] = {
    "afmoe": Family("AfmoeForCausalLM", DEMO_CONFIG, "mlp.router.gate.weight", 1.0, "mlp.expert_bias"),
    "mixtral": Family(
        "MixtralForCausalLM",
        _SMALL_LLAMA_LIKE | {"intermediate_size": 64, "num_local_experts": 7, "sliding_window": 64},
        "mlp.gate.weight",
        2.0,
    ),
    "gpt_oss": Family(
        "GptOssForCausalLM",
        _SMALL_LLAMA_LIKE
        | {
            "intermediate_size": 64,
            "num_local_experts": 9,
            "sliding_window": 64,
            "max_position_embeddings": 131072,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        },
        "mlp.router.weight",
        2.0,
        extra_normal=(
            ("mlp.router.bias", 0.5),
            ("self_attn.sinks", 1.0),
            ("_proj.bias", 0.05),  # q/k/v/o
            ("_proj_bias", 0.05),  # the experts' gate_up and down
        ),
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        _SMALL_LLAMA_LIKE
        | {
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "num_experts": 9,
            "num_experts_per_tok": 3,
            "norm_topk_prob": True,
            "mlp_only_layers": [0],
        },
        "mlp.gate.weight",
        2.0,
    ),
    "deepseek_v3": Family(
        "DeepseekV3ForCausalLM",
        {k: v for k, v in _SMALL_LLAMA_LIKE.items() if k != "head_dim"}  # transformers derives it
        | {
            "num_key_value_heads": 4,
            "intermediate_size": 256,
            "moe_intermediate_size": 64,
            "first_k_dense_replace": 1,
            "n_routed_experts": 10,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": 3,
            "n_shared_experts": 1,
            "routed_scaling_factor": 2.5,
            "q_lora_rank": 64,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
        },
        "mlp.gate.weight",
        1.0,
        "mlp.gate.e_score_correction_bias",
    ),
}

# The trained demo model (scripts/train_demo_model.py), shipped as package data.
DEMO_MODEL_DIR = Path(__file__).with_name("demo_model")

# Gate and LM head read RMS-normalised states, so a weight std of SCALE / sqrt(hidden) gives logits with a
# std near SCALE: sigmoid scores clearly apart, and greedy decoding rarely on a near-tie.
GATE_STD_SCALE = 1.0
LM_HEAD_STD_SCALE = 2.0
EXPERT_BIAS_STD = 0.05


def demo_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The shipped demo model's tokenizer (byte-level BPE, ChatML chat template with tools); a fresh copy."""
    return transformers.AutoTokenizer.from_pretrained(demo_model_path(), local_files_only=True)


def full_config(
    config: dict, tokenizer: transformers.PreTrainedTokenizerFast, defaults: dict = DEMO_CONFIG
) -> dict:
    defaults = copy.deepcopy(defaults)
    defaults.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        # A chat turn ends with <|im_end|>, plain text with <|end_of_text|>: both stop generation.
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return {**defaults, **copy.deepcopy(config)}


def _sharpen_decisions(model: transformers.PreTrainedModel, family: Family, hidden_size: int) -> None:
    """Make routing depend on the token (transformers zeroes gates and expert biases), widen the logits,
    and give the family's other near-zero parameters (biases, sinks) values that matter."""
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD_SCALE / hidden_size**0.5)
        for name, param in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name.endswith(family.gate_suffix):
                param.normal_(0.0, family.gate_std_scale / hidden_size**0.5)
            elif family.bias_suffix and name.endswith(family.bias_suffix):
                param.normal_(0.0, EXPERT_BIAS_STD)
            for suffix, std in family.extra_normal:
                if name.endswith(suffix):
                    param.normal_(0.0, std)


def _build_model(config: dict, seed: int, family: Family) -> transformers.PreTrainedModel:
    cfg = family.config_class(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.model_class(cfg).to(torch.float32)
        _sharpen_decisions(model, family, cfg.hidden_size)
    return model.eval()


def _write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Run `write(tmp)` on a temporary sibling directory, then rename it to `path`.

    So `path` is either absent, empty or complete; FileExistsError if it already holds files.
    """
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} already exists and is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        write(tmp)
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


def write_afmoe_checkpoint(path: str | Path, config: dict, seed: int = 0, tokenizer: bool = True) -> Path:
    """write_checkpoint of an AfmoeForCausalLM; keys missing from `config` come from DEMO_CONFIG."""
    return write_checkpoint(path, config, seed, tokenizer, family="afmoe")


def write_checkpoint(
    path: str | Path,
    config: dict,
    seed: int = 0,
    tokenizer: bool = True,
    family: str = "afmoe",
    hot_experts: tuple[int, ...] = (),
) -> Path:
    """Write a random model of `family` (a FAMILIES key) and the demo tokenizer to `path` with
    save_pretrained.

    Keys missing from `config` come from the family's defaults; vocab_size defaults to the demo
    tokenizer's size. Written atomically (see _write_atomically). Random routing that depends on the
    token, for the tests. `hot_experts` (AFMoE): their expert_bias is raised by 1 in every MoE layer,
    above any sigmoid score, so each token picks min(top-k, len(hot)) of them: a skewed load.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    kind = FAMILIES[family]
    tok = demo_tokenizer()
    full = full_config(config, tok, kind.defaults)
    if tokenizer and full["vocab_size"] < len(tok):
        raise ValueError(f"vocab_size {full['vocab_size']} is smaller than the demo tokenizer's {len(tok)}")
    model = _build_model(full, seed, kind)
    if hot_experts:
        biases = [p for n, p in model.named_parameters() if n.endswith("expert_bias")]
        if not biases:
            raise ValueError(f"family {family!r} has no expert_bias to skew")
        with torch.no_grad():
            for bias in biases:
                bias[list(hot_experts)] += 1.0

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer:
            tok.model_max_length = full["max_position_embeddings"]
            tok.save_pretrained(tmp, save_jinja_files=False)

    return _write_atomically(Path(path), write)


def copy_demo_model(path: str | Path) -> Path:
    """Copy the shipped demo model to `path` (FileExistsError if it holds files), as atomically as writing."""
    return _write_atomically(
        Path(path), lambda tmp: shutil.copytree(demo_model_path(), tmp, dirs_exist_ok=True)
    )


def demo_model_path() -> Path:
    """The shipped demo model's directory: the default model of generate, serve and batch."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_MODEL_DIR}: reinstall moe-cluster")
    return DEMO_MODEL_DIR
