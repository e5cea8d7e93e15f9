import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AfmoeForCausalLM, AutoTokenizer

from cluster import demo
from cluster.engine import Engine
from router.tokenizer import Tokenizer
from scripts import train_demo_model
from tests.conftest import hf_greedy

ROOT = Path(__file__).resolve().parents[1]
# Ordinary prompts, code and prose: the demo model was trained on Python's standard library.
PROMPTS = ["def read_config(path):", "import os\n\n", "The experts", "The quick brown fox", "Hello"]

SMALL = {"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_checkpoint_loads_in_transformers_with_nontrivial_routing(tmp_path: Path) -> None:
    demo.write_afmoe_checkpoint(tmp_path, SMALL)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["AfmoeForCausalLM"]
    assert config["vocab_size"] == len(demo.demo_tokenizer())
    assert config["num_experts"] == 8
    assert config["hidden_size"] == demo.DEMO_CONFIG["hidden_size"]
    assert (tmp_path / "tokenizer.json").is_file()
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in _tensors(tmp_path)

    model = AfmoeForCausalLM.from_pretrained(tmp_path)
    moe = model.model.layers[1].mlp
    gate, bias = moe.router.gate.weight, moe.expert_bias
    assert gate.abs().min() > 0
    assert bias.abs().min() > 0
    assert bias.dtype == torch.float32
    assert gate.std().item() == pytest.approx(demo.GATE_STD_SCALE / config["hidden_size"] ** 0.5, rel=0.2)


def test_greedy_logits_have_no_near_ties(tmp_path: Path) -> None:
    demo.write_afmoe_checkpoint(tmp_path, SMALL)
    model = AfmoeForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        top2 = model(ids).logits[0].topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def test_writes_are_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _tensors(demo.write_afmoe_checkpoint(tmp_path / "a", SMALL, seed=3))
    b = _tensors(demo.write_afmoe_checkpoint(tmp_path / "b", SMALL, seed=3))
    c = _tensors(demo.write_afmoe_checkpoint(tmp_path / "c", SMALL, seed=4, tokenizer=False))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert not (tmp_path / "c" / "tokenizer.json").exists()


def test_refuses_a_non_empty_target_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "model"
    demo.write_afmoe_checkpoint(target, SMALL)
    with pytest.raises(FileExistsError):
        demo.write_afmoe_checkpoint(target, SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        demo.write_afmoe_checkpoint(tmp_path, {**SMALL, "vocab_size": 100})


def test_demo_model_is_the_shipped_trained_trinity_shaped_checkpoint() -> None:
    path = demo.demo_model_path()
    assert path == demo.DEMO_MODEL_DIR
    assert (path / "model.safetensors").stat().st_size <= 25 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["AfmoeForCausalLM"] and config["mup_enabled"]
    assert {"sliding_attention", "full_attention"} == set(config["layer_types"])
    assert config["num_experts"] >= 16 and config["num_experts_per_tok"] == 4
    assert config["num_shared_experts"] >= 1
    assert config["num_hidden_layers"] - config["num_dense_layers"] >= 3
    training = json.loads((path / "training.json").read_text())
    assert training["corpus"]["sha256"] == train_demo_model.CORPUS_SHA256
    # aux-loss-free balancing moved every layer's selection bias away from transformers' zeros
    biases = [t for name, t in _tensors(path).items() if name.endswith("mlp.expert_bias")]
    assert len(biases) == config["num_hidden_layers"] - config["num_dense_layers"]
    assert all(b.abs().max() > 0 for b in biases)


def test_copy_demo_model_is_byte_identical_and_refuses_a_non_empty_target(tmp_path: Path) -> None:
    copy = demo.copy_demo_model(tmp_path / "copy")
    names = sorted(p.name for p in demo.demo_model_path().iterdir())
    assert sorted(p.name for p in copy.iterdir()) == names
    assert all((copy / n).read_bytes() == (demo.demo_model_path() / n).read_bytes() for n in names)
    with pytest.raises(FileExistsError):
        demo.copy_demo_model(copy)


@pytest.mark.skipif(
    not train_demo_model.CORPUS_DIR.is_dir(), reason="the pinned corpus is not on this machine"
)
def test_held_out_loss_is_well_below_a_unigram_baseline() -> None:
    recipe = train_demo_model.Recipe()
    train_texts, held_texts, _ = train_demo_model.load_corpus()
    tokenizer = AutoTokenizer.from_pretrained(demo.demo_model_path())
    model = AfmoeForCausalLM.from_pretrained(demo.demo_model_path(), dtype=torch.float32)
    held_out = train_demo_model.token_stream(tokenizer, held_texts)
    train_stream = train_demo_model.token_stream(tokenizer, train_texts)

    loss = train_demo_model.held_out_loss(model, held_out, recipe)
    unigram = train_demo_model.unigram_loss(train_stream, held_out, len(tokenizer), recipe)
    assert loss < unigram - math.log(4), (loss, unigram)  # a quarter of the unigram perplexity at most
    training = json.loads((demo.demo_model_path() / "training.json").read_text())
    assert training["held_out_loss"] == pytest.approx(loss, rel=1e-4)
    assert training["unigram_loss"] == pytest.approx(unigram, rel=1e-6)


def _python(*args: str, **env: str) -> str:
    """Runs this repository's code in a fresh interpreter; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    run = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _smoke_run(out: Path) -> dict:
    _python("scripts/train_demo_model.py", "--smoke", "--out", str(out))
    return json.loads((out / "training.json").read_text())


@pytest.mark.skipif(
    not train_demo_model.CORPUS_DIR.is_dir(), reason="the pinned corpus is not on this machine"
)
def test_a_shortened_training_run_is_reproducible(tmp_path: Path) -> None:
    first, second = _smoke_run(tmp_path / "a"), _smoke_run(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["held_out_loss"] == second["held_out_loss"]
    assert first["train_loss_first_last"] == second["train_loss_first_last"]
    # the shipped tokenizer is the one this recipe trains
    shipped = (demo.demo_model_path() / "tokenizer.json").read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == shipped


@pytest.fixture(scope="module")
def demo_engine(ray_cluster, demo_model):
    with Engine(demo_model, expert_shards=2, router_cpus=0.5, expert_cpus=0.5, max_model_len=256) as engine:
        yield engine


def test_engine_with_two_shards_matches_transformers_greedy(demo_engine, demo_model) -> None:
    tokenizer = Tokenizer.from_model_dir(demo_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    reference = AfmoeForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    expected = [hf_greedy(reference, p, 24) for p in prompts]
    completions = demo_engine.generate(prompts, max_new_tokens=24, ignore_eos=True)
    assert [c.token_ids for c in completions] == expected


def test_generate_with_the_default_model_prints_readable_text(ray_cluster) -> None:
    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    address = ray.get_runtime_context().gcs_address
    out = _python(
        "-m", "cluster.cli.main", "generate", "--expert-shards", "2", *prompts, "--json", RAY_ADDRESS=address
    )
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert len(texts) == len(PROMPTS)
    for text in texts:
        assert "\ufffd" not in text
        assert text.isascii() and all(c.isprintable() or c in "\n\t" for c in text), text
        assert len(re.findall(r"[A-Za-z]{3,}", text)) >= 5, text  # words, not only punctuation
