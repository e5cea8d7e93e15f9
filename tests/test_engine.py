"""The Engine on the demo model: text in and out, sampling, bad input, the CLI, operator-visible names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from pydantic import ValidationError

from cluster.demo import DEMO_TOKENIZER_VOCAB_SIZE as VOCAB
from cluster.engine import Engine
from experts.checkpoint import CheckpointError
from router.config import ConfigError
from router.errors import InvalidRequest


@pytest.fixture(scope="module")
def engine(ray_cluster, demo_model):
    with Engine(demo_model, expert_shards=2, router_cpus=0.5, expert_cpus=0.5, max_model_len=256) as eng:
        yield eng


def test_text_prompt_round_trip(engine):
    [completion] = engine.generate("The experts", max_new_tokens=6, ignore_eos=True)
    assert len(completion.token_ids) == 6
    assert isinstance(completion.text, str) and completion.text
    assert completion.finish_reason == "length"


def test_batching_never_changes_greedy_results(engine):
    prompts = [[7, 8, 9], list(range(100, 140)), [300] * 5, [11, 12]]
    together = engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
    alone = [engine.generate([p], max_new_tokens=10, ignore_eos=True)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_seeded_sampling_is_reproducible(engine):
    def draw(seed: int) -> list[int]:
        return engine.generate([[5, 6, 7]], max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)[
            0
        ].token_ids

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    greedy = engine.generate([[5, 6, 7]], max_new_tokens=12, ignore_eos=True)[0].token_ids
    top1 = engine.generate([[5, 6, 7]], max_new_tokens=12, temperature=1.0, top_k=1, seed=3, ignore_eos=True)
    assert top1[0].token_ids == greedy


def test_expert_counters_add_up_to_the_rows_the_router_sent(engine):
    before = engine.expert_counters()
    engine.stats(reset=True)
    engine.generate([list(range(5, 45)), [7, 8, 9]], max_new_tokens=8, ignore_eos=True)
    sent = engine.stats()["rows_sent"]
    after = engine.expert_counters()

    assert sum(a["rows"] - b["rows"] for a, b in zip(after, before, strict=True)) == sent > 0
    for a, b in zip(after, before, strict=True):  # both shards served, and timed what they computed
        assert a["dispatches"] > b["dispatches"]
        assert a["compute_seconds"] > b["compute_seconds"]


def test_stops_on_eos(engine, demo_model):
    eos = json.loads((demo_model / "config.json").read_text())["eos_token_id"]
    out = engine.generate([[5, 6, 7]], max_new_tokens=200)[0]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] in eos
    else:
        assert len(out.token_ids) == 200 and not set(out.token_ids) & set(eos)


def test_logits_shape(engine):
    logits = engine.logits([1, 2, 3, 4])
    assert logits.shape == (4, VOCAB) and logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("prompt", "options", "message"),
    [
        ([], {}, "prompt is empty"),
        ([1, 2, VOCAB], {}, "outside the vocabulary"),
        ([-1], {}, "outside the vocabulary"),
        ([1] * 256, {}, "max_model_len"),
        ([1, 2], {"max_new_tokens": 0}, "max_tokens must be >= 1"),
        ([1, 2], {"temperature": -0.5}, "temperature"),
        ([1, 2], {"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_engine_survives(engine, prompt, options, message):
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt], **options)
    assert len(engine.generate([[1, 2, 3]], max_new_tokens=2, ignore_eos=True)[0].token_ids) == 2


def test_bad_request_in_a_batch_fails_before_any_work(engine):
    with pytest.raises(InvalidRequest):
        engine.generate([[1, 2, 3], []], max_new_tokens=2)
    assert ray.get(engine.router.info.remote())["sequences"] == 0


def test_model_dir_without_config(ray_cluster, tmp_path):
    with pytest.raises(ValidationError, match=r"no config\.json"):
        Engine(tmp_path)


def test_pickle_checkpoint_refused(ray_cluster, tmp_path, demo_model):
    (tmp_path / "config.json").write_text((demo_model / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refusing pickle checkpoint pytorch_model\.bin"):
        Engine(tmp_path)


def test_unsupported_architecture(ray_cluster, tmp_path, demo_model):
    config = json.loads((demo_model / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        Engine(tmp_path)


def test_actors_are_named_for_operators(engine):
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # explicit: other local clusters may be running
    alive = {a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])}
    assert {"RouterActor", "ExpertActor"} <= alive


def test_cli_generate_joins_the_cluster_and_matches_the_engine(engine, demo_model):
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    cli = Path(sys.executable).with_name("moe-cluster")
    run = subprocess.run(
        [
            str(cli),
            "generate",
            "--model",
            str(demo_model),
            "--expert-shards",
            "2",
            "--prompt-ids",
            "7,8,9",
            "--prompt",
            "The experts",
            "--max-tokens",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    expected = engine.generate([[7, 8, 9], "The experts"], max_new_tokens=5)
    assert [line["token_ids"] for line in lines] == [c.token_ids for c in expected]
    assert [line["text"] for line in lines] == [c.text for c in expected]


def test_cli_reports_bad_model_dir(tmp_path):
    cli = Path(sys.executable).with_name("moe-cluster")
    run = subprocess.run(
        [str(cli), "generate", "--model", str(tmp_path / "missing"), "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "does not exist" in run.stderr and "Traceback" not in run.stderr
