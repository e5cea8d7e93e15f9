"""Train the shipped demo model: a small Trinity-shaped AFMoE on CPython 3.11.7's standard library sources.

The model is transformers' own AfmoeForCausalLM (so the engine's parity reference loads it unchanged) with
Trinity's switches: sliding-window and global attention layers, muP (input scaling and per-width learning
rates), a shared expert, 16 routed experts top-4 with sigmoid scores, and an expert bias updated without an
auxiliary loss. The tokenizer is a byte-level BPE trained on the same (training) files.

Reproducible: the corpus is pinned by a hash of its file names and contents, seeds are fixed, torch runs
deterministic algorithms on one thread. Minutes on 2 CPU cores (hold the shared lock):

    flock /tmp/moe-heavy.lock python scripts/train_demo_model.py            # writes cluster/demo_model
    flock /tmp/moe-heavy.lock python scripts/train_demo_model.py --check    # retrain, compare held-out loss
    python scripts/train_demo_model.py --smoke --out DIR                    # a few steps of a tiny model
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers.models.afmoe.modeling_afmoe import AfmoeSparseMoeBlock

from cluster import demo

ROOT = Path(__file__).resolve().parents[1]
CORPUS_DIR = Path("/root/.pyenv/versions/3.11.7/lib/python3.11")
CORPUS_VERSION = "CPython 3.11.7 Lib/*.py (pyenv build), 168 files"
CORPUS_SHA256 = "110b1c1c3a8284452cac64add7fef201708f4d6a8a4ef27f25bb8056542e277d"
HELD_OUT_EVERY = 20  # every 20th file (sorted by name) is held out from the tokenizer and the model
CHAT_TEMPLATE = Path(__file__).with_name("demo_chat_template.jinja")
CHECK_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class Recipe:
    steps: int = 480
    batch: int = 16
    seq_len: int = 256
    lr: float = 6e-3
    warmup_steps: int = 20
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    mup_base_width: int = 64  # muP: matrix learning rates scale with mup_base_width / hidden_size
    bias_update_rate: float = 1e-2  # aux-loss-free balancing: expert_bias step per training step
    eval_tokens: int = 65536
    seed: int = 0
    config: dict = dataclasses.field(default_factory=lambda: {"initializer_range": 0.02})


SMOKE = dataclasses.replace(
    Recipe(),
    steps=3,
    batch=2,
    seq_len=32,
    warmup_steps=1,
    eval_tokens=256,
    config={**Recipe().config, "num_hidden_layers": 2},
)


def load_corpus(directory: Path = CORPUS_DIR) -> tuple[list[str], list[str], str]:
    """(training texts, held-out texts, sha256 of the sorted file names and contents)."""
    files = sorted(directory.glob("*.py"))
    digest = hashlib.sha256()
    texts = []
    for file in files:
        data = file.read_bytes()
        digest.update(file.name.encode() + b"\0" + data + b"\0")
        texts.append(data.decode("utf-8"))
    train = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY]
    held_out = [t for i, t in enumerate(texts) if not i % HELD_OUT_EVERY]
    return train, held_out, digest.hexdigest()


def train_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=demo.DEMO_TOKENIZER_VOCAB_SIZE - len(demo.TOOL_TOKENS),
        special_tokens=demo.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in demo.TOOL_TOKENS])
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{demo.BOS_TOKEN} $A",
        pair=f"{demo.BOS_TOKEN} $A {demo.BOS_TOKEN} $B",
        special_tokens=[(demo.BOS_TOKEN, bpe.token_to_id(demo.BOS_TOKEN))],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=demo.BOS_TOKEN,
        eos_token=demo.EOS_TOKEN,
        pad_token=demo.PAD_TOKEN,
        chat_template=CHAT_TEMPLATE.read_text(),
        model_max_length=demo.DEMO_CONFIG["max_position_embeddings"],
    )


def token_stream(tokenizer: transformers.PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Every file as <bos> text <eos>, concatenated."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return torch.tensor([i for e in encodings for i in (bos, *e.ids, eos)], dtype=torch.long)


def _windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows covering the first max_tokens predictions of the stream."""
    count = min(max_tokens, len(stream) - 1) // seq_len
    inputs = stream[: count * seq_len].view(count, seq_len)
    targets = stream[1 : count * seq_len + 1].view(count, seq_len)
    return inputs, targets


@torch.no_grad()
def held_out_loss(model: transformers.AfmoeForCausalLM, stream: torch.Tensor, recipe: Recipe) -> float:
    """Mean next-token cross-entropy (nats) over the held-out windows."""
    inputs, targets = _windows(stream, recipe.seq_len, recipe.eval_tokens)
    model.eval()
    total = 0.0
    for x, y in zip(inputs.split(recipe.batch), targets.split(recipe.batch), strict=True):
        logits = model(input_ids=x).logits
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / targets.numel()


def unigram_loss(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int, recipe: Recipe) -> float:
    """The same held-out targets scored by add-one smoothed token frequencies of the training stream."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    _, targets = _windows(held_out, recipe.seq_len, recipe.eval_tokens)
    return -log_probs[targets.flatten()].mean().item()


class ExpertBalancer:
    """Aux-loss-free load balancing, as DeepSeek-V3 and Trinity train: after each step, raise the selection
    bias of experts that got fewer tokens than the mean and lower it for those that got more. The bias only
    steers top-k selection; the combine weights stay the unbiased sigmoid scores."""

    def __init__(self, model: transformers.AfmoeForCausalLM, rate: float) -> None:
        self.blocks = [m for m in model.modules() if isinstance(m, AfmoeSparseMoeBlock)]
        self.rate = rate
        self.loads: list[torch.Tensor | None] = [None] * len(self.blocks)
        for index, block in enumerate(self.blocks):
            block.router.register_forward_hook(self._recorder(index))

    def _recorder(self, index: int):
        def record(module, args, output) -> None:
            self.loads[index] = torch.bincount(output[2].flatten(), minlength=module.num_experts)

        return record

    @torch.no_grad()
    def step(self) -> None:
        for block, load in zip(self.blocks, self.loads, strict=True):
            load = load.float()
            block.expert_bias += self.rate * torch.sign(load.mean() - load)
            block.expert_bias -= block.expert_bias.mean()

    def max_over_mean(self) -> list[float]:
        """Per MoE layer, the busiest expert's tokens over the mean, in the last recorded forward."""
        return [round((load.max() / load.float().mean()).item(), 3) for load in self.loads]


def _optimizer(model: transformers.AfmoeForCausalLM, recipe: Recipe) -> torch.optim.AdamW:
    """muP for Adam: hidden and output matrices learn at lr * base / width, embeddings and norms at lr."""
    width_ratio = recipe.mup_base_width / model.config.hidden_size
    matrices, vectors, embeddings = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = embeddings if "embed_tokens" in name else matrices if param.ndim >= 2 else vectors
        group.append(param)
    groups = [
        {"params": matrices, "lr": recipe.lr * width_ratio, "weight_decay": recipe.weight_decay},
        {"params": embeddings, "lr": recipe.lr, "weight_decay": 0.0},
        {"params": vectors, "lr": recipe.lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.final_lr_ratio + (1 - recipe.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(
    tokenizer: transformers.PreTrainedTokenizerFast, recipe: Recipe
) -> transformers.AfmoeForCausalLM:
    config = transformers.AfmoeConfig(**demo.full_config(recipe.config, tokenizer))
    model = transformers.AfmoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # transformers zeroes the gates: every token would tie on the same experts
        for name, param in model.named_parameters():
            if name.endswith("mlp.router.gate.weight"):
                param.normal_(0.0, config.initializer_range)
    return model


def train(recipe: Recipe, out: Path, quiet: bool = False) -> dict:
    """Tokenizer, model, training; writes the checkpoint and training.json into `out`; returns the summary."""
    torch.manual_seed(recipe.seed)
    started = time.monotonic()
    train_texts, held_texts, corpus_sha256 = load_corpus()
    if corpus_sha256 != CORPUS_SHA256:
        raise SystemExit(f"corpus {CORPUS_DIR} changed: sha256 {corpus_sha256}, pinned {CORPUS_SHA256}")
    tokenizer = train_tokenizer(train_texts)
    train_stream, held_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_texts)
    model = build_model(tokenizer, recipe)
    balancer = ExpertBalancer(model, recipe.bias_update_rate)
    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    sampler = torch.Generator().manual_seed(recipe.seed)
    offsets = torch.arange(recipe.seq_len + 1)

    model.train()
    bar = tqdm(range(recipe.steps), desc="training", file=sys.stderr, disable=quiet)
    losses = []
    for _ in bar:
        starts = torch.randint(0, len(train_stream) - recipe.seq_len - 1, (recipe.batch,), generator=sampler)
        batch = train_stream[starts[:, None] + offsets]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        balancer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    balance = balancer.max_over_mean()

    summary = {
        "corpus": {"version": CORPUS_VERSION, "sha256": corpus_sha256, "held_out_every": HELD_OUT_EVERY},
        "recipe": dataclasses.asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train_stream),
        "held_out_tokens_scored": _windows(held_stream, recipe.seq_len, recipe.eval_tokens)[1].numel(),
        "train_loss_first_last": [round(losses[0], 4), round(sum(losses[-10:]) / len(losses[-10:]), 4)],
        "held_out_loss": held_out_loss(model, held_stream, recipe),
        "unigram_loss": unigram_loss(train_stream, held_stream, len(tokenizer), recipe),
        "expert_load_max_over_mean_last_step": balance,
        "seconds": round(time.monotonic() - started, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _deterministic() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def _check(recipe: Recipe, shipped: Path, results: Path) -> int:
    """Retrain into a temporary directory; the shipped model's held-out loss must be reproduced within 1%."""
    _, held_texts, _ = load_corpus()
    tokenizer = transformers.AutoTokenizer.from_pretrained(shipped, local_files_only=True)
    model = transformers.AfmoeForCausalLM.from_pretrained(shipped, dtype=torch.float32)
    shipped_loss = held_out_loss(model, token_stream(tokenizer, held_texts), recipe)
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(recipe, Path(tmp))
        weights = (Path(tmp) / "model.safetensors").read_bytes()
    same_weights = weights == (shipped / "model.safetensors").read_bytes()
    relative = abs(summary["held_out_loss"] - shipped_loss) / shipped_loss
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu": platform.processor()},
        "shipped_held_out_loss": shipped_loss,
        "retrained_held_out_loss": summary["held_out_loss"],
        "relative_difference": relative,
        "tolerance": CHECK_TOLERANCE,
        "identical_safetensors": same_weights,
        "retrain": summary,
    }
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"train_demo_model_check_{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"shipped {shipped_loss:.4f}, retrained {summary['held_out_loss']:.4f} nats: {relative:.2%} apart")
    print(f"identical weights: {same_weights}; wrote {path}")
    return 0 if relative <= CHECK_TOLERANCE else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=demo.DEMO_MODEL_DIR, help="checkpoint dir (replaced)")
    parser.add_argument("--check", action="store_true", help="retrain and compare with the model in --out")
    parser.add_argument("--smoke", action="store_true", help="a few steps of a 2-layer model (for tests)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    _deterministic()
    recipe = SMOKE if args.smoke else Recipe()
    if args.check:
        return _check(recipe, args.out, args.results)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    summary = train(recipe, args.out, quiet=args.smoke)
    print(json.dumps({k: summary[k] for k in ("held_out_loss", "unigram_loss", "seconds", "parameters")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
