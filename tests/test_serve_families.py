"""Random checkpoints of the other families (from `demo-model --arch`'s writer) through the commands:
Qwen3-MoE through `generate`, Mixtral through `batch`, and Qwen3-MoE, Mixtral, GPT-OSS and DeepSeek-V3
(with YaRN rope) each through the same Serve app with the real openai client; greedy tokens equal
transformers' own. For Mixtral, GPT-OSS and DeepSeek-V3 the per-expert load and rank-imbalance metrics
are read back from Ray's metrics export."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM

from cluster.demo import write_checkpoint
from router.config import ModelConfig
from router.tokenizer import Tokenizer
from tests.conftest import hf_greedy, served_app, served_model, small_app
from tests.test_batch import read_output
from tests.toolkit import checkout_cli, scrape, wait_for

PROMPTS = ["The experts", "def read_config(path):"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("qwen3") / "model", {}, seed=4, family="qwen3_moe")


@pytest.fixture(scope="module")
def mixtral_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mixtral") / "model"
    return write_checkpoint(path, {"sliding_window": 6}, seed=5, family="mixtral")


@pytest.fixture(scope="module")
def gpt_oss_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gpt_oss") / "model"
    return write_checkpoint(path, {"sliding_window": 8}, seed=6, family="gpt_oss")


@pytest.fixture(scope="module")
def deepseek_model(tmp_path_factory) -> Path:
    """9 experts in 3 groups (no even split); YaRN with the published config's betas and mscales over a
    16-token original context, which the served prompt and its completion run past."""
    yarn = {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    }  # fmt: skip
    cfg = {"n_routed_experts": 9, "n_group": 3, "topk_group": 2, "max_position_embeddings": 128}
    cfg["rope_scaling"] = yarn
    return write_checkpoint(tmp_path_factory.mktemp("deepseek") / "model", cfg, seed=7, family="deepseek_v3")


@pytest.fixture(scope="module")
def reference(qwen3_model) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM.from_pretrained(qwen3_model, dtype=torch.float32).eval()


def _cli(*args: str) -> str:
    """`moe-cluster ARGS` in a fresh interpreter joined to the session's cluster; its stdout."""
    address = ray.get_runtime_context().gcs_address
    run = checkout_cli(*args, env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"})
    assert run.returncode == 0, run.stderr
    return run.stdout


def _assert_greedy(model: Path, reference, prompt: list[int], got: list[int]) -> None:
    """`got` is transformers' greedy continuation, up to NEW_TOKENS or an end token."""
    eos = set(ModelConfig.from_model_dir(model).eos_token_ids)
    assert got == hf_greedy(reference, prompt, NEW_TOKENS)[: len(got)]
    assert len(got) == NEW_TOKENS or got[-1] in eos


def test_generate_takes_a_qwen3_moe_checkpoint(ray_cluster, qwen3_model, reference) -> None:
    tokenizer = Tokenizer.from_model_dir(qwen3_model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    args = [arg for ids in prompts for arg in ("--prompt-ids", ",".join(map(str, ids)))]
    out = _cli(
        "generate", "--model", str(qwen3_model), "--expert-shards", "2", "--max-tokens", str(NEW_TOKENS),
        "--json", *args,
    )  # fmt: skip
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(prompts)
    for record, ids in zip(records, prompts, strict=True):
        _assert_greedy(qwen3_model, reference, ids, record["token_ids"])


def test_batch_takes_a_mixtral_checkpoint(ray_cluster, mixtral_model, tmp_path) -> None:
    model = mixtral_model
    reference = MixtralForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    prompts = [[5 + (7 * n + k) % 300 for k in range(3 + 4 * n)] for n in range(4)]  # some past the window
    records = [{"id": f"r{n}", "prompt": p, "max_tokens": NEW_TOKENS} for n, p in enumerate(prompts)]
    source, result = tmp_path / "in.jsonl", tmp_path / "out"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    _cli(
        "batch", "--input", str(source), "--output", str(result), "--model", str(model),
        "--expert-shards", "2", "--router-cpus", "0.5", "--expert-cpus", "0.5",
    )  # fmt: skip
    by_id = {r["id"]: r for r in read_output(result)}
    assert set(by_id) == {r["id"] for r in records}
    for n, prompt in enumerate(prompts):
        _assert_greedy(model, reference, prompt, by_id[f"r{n}"]["token_ids"])


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


def test_mixtral_gpt_oss_and_deepseek_served_with_openai_client_equal_transformers_and_count_experts(
    serve_http, metrics_export_port, mixtral_model, gpt_oss_model, deepseek_model
) -> None:
    """One request through each family's app (all up at once, so their metrics arrive together);
    then moe_expert_tokens counts every (token, expert) pair of every MoE layer, under expert ids of
    that model, and moe_expert_imbalance has one series per MoE layer."""
    with contextlib.ExitStack() as apps:
        expected_pairs = {}
        families = (("mixtral", mixtral_model), ("gpt-oss", gpt_oss_model), ("deepseek", deepseek_model))
        for family, model_dir in families:
            config = ModelConfig.from_model_dir(model_dir)
            assert config.num_experts % 2  # no even split over the 2 shards
            assert family != "deepseek" or config.rope.softmax_mscale() > 1.0
            reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            tokenizer = Tokenizer.from_model_dir(model_dir)
            ids = tokenizer.encode(PROMPTS[1])
            name = f"served-{family}"
            options = small_app(
                model_dir, expert_shards=2, max_model_len=128, max_num_seqs=8, served_model_name=name
            )
            url = apps.enter_context(served_app(serve_http, name, options))
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            out = client.completions.create(
                model=name, prompt=ids, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
            )
            assert out.choices[0].text == tokenizer.decode(hf_greedy(reference, ids, NEW_TOKENS)), family
            computed = len(ids) + NEW_TOKENS - 1  # the last sampled token is not fed back
            expected_pairs[name] = (config, computed * config.num_experts_per_tok * len(config.moe_layers))

        def per_expert(name: str) -> dict[str, float]:
            return {s["expert"]: v for s, v in scrape(metrics_export_port, "moe_expert_tokens", model=name)}

        def all_counted() -> bool:
            return all(sum(per_expert(n).values()) == pairs for n, (_, pairs) in expected_pairs.items())

        assert wait_for(all_counted, 60, 1.0), {n: per_expert(n) for n in expected_pairs}
        for name, (config, _) in expected_pairs.items():
            assert set(per_expert(name)) <= {str(e) for e in range(config.num_experts)}
            assert len(per_expert(name)) > config.num_experts_per_tok  # routing depends on the token
            imbalance = scrape(metrics_export_port, "moe_expert_imbalance", model=name)
            assert sorted(s["layer"] for s, _ in imbalance) == sorted(map(str, config.moe_layers)), name
            assert all(1.0 <= v <= 2.0 for _, v in imbalance)  # max / mean over 2 ranks
