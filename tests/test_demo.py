import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AfmoeForCausalLM

from cluster import demo

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


def test_demo_model_path_honours_cache_env_and_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_CLUSTER_CACHE", str(tmp_path))
    path = demo.demo_model_path()
    assert path == tmp_path / demo.DEMO_MODEL_DIRNAME
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == demo.DEMO_CONFIG["num_hidden_layers"]
    written = (path / "model.safetensors").stat().st_mtime_ns

    assert demo.demo_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
