"""A Qwen3-MoE random checkpoint (from `demo-model --arch qwen3_moe`'s writer) through `generate` and
through the same Serve app with the real openai client: greedy tokens equal transformers' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
import torch
from transformers import Qwen3MoeForCausalLM

from cluster.demo import write_checkpoint
from router.config import ModelConfig
from router.tokenizer import Tokenizer
from tests.conftest import hf_greedy, served_app, served_model, small_app
from tests.toolkit import REPO

PROMPTS = ["The experts", "def read_config(path):"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", {}, seed=4, family="qwen3_moe")


@pytest.fixture(scope="module")
def reference(qwen3_model) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()


def test_generate_takes_a_qwen3_moe_checkpoint(ray_cluster, qwen3_model, reference) -> None:
    tokenizer = Tokenizer.from_model_dir(qwen3_model)
    eos = set(ModelConfig.from_model_dir(qwen3_model).eos_token_ids)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    args = [arg for ids in prompts for arg in ("--prompt-ids", ",".join(map(str, ids)))]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "cluster.cli.main", "generate", "--model", str(qwen3_model)]
    run = subprocess.run(
        [*command, "--expert-shards", "2", "--max-tokens", str(NEW_TOKENS), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(records) == len(prompts)
    for record, ids in zip(records, prompts, strict=True):
        expected, got = hf_greedy(reference, ids, NEW_TOKENS), record["token_ids"]
        assert got == expected[: len(got)]
        assert len(got) == NEW_TOKENS or got[-1] in eos


@pytest.fixture(scope="module")
def qwen3_url(serve_http, qwen3_model) -> Iterator[str]:
    options = small_app(qwen3_model, expert_shards=2, max_model_len=128, max_num_seqs=8)
    with served_app(serve_http, "qwen3", options) as url:
        yield url


def test_qwen3_moe_served_with_openai_client_equals_transformers(qwen3_model, qwen3_url, reference) -> None:
    config = ModelConfig.from_model_dir(qwen3_model)
    assert config.architecture == "Qwen3MoeForCausalLM" and config.num_experts % 2  # no even split
    tokenizer = Tokenizer.from_model_dir(qwen3_model)
    client = openai.OpenAI(base_url=f"{qwen3_url}/v1", api_key="unused", max_retries=0, timeout=120)
    model = served_model(qwen3_url)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        expected = hf_greedy(reference, ids, NEW_TOKENS)
        out = client.completions.create(
            model=model, prompt=ids, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        [choice] = out.choices
        assert out.usage.completion_tokens == NEW_TOKENS
        assert choice.text == tokenizer.decode(expected), prompt
