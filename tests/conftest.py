"""Shared fixtures: one local Ray cluster per test session, checkpoints written by transformers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from cluster.demo import copy_demo_model, write_afmoe_checkpoint, write_checkpoint

# The "api" Serve app's fixtures (api_url, http, client, model_name, engine, tokenizer), module-scoped.
pytest_plugins = ["tests.serve_api_app"]

# Small AFMoE configs covering the architecture's switches (see test_parity.py for which is which).
PARITY_CONFIGS: dict[str, dict] = {
    "mup-gqa-untied-1dense": dict(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_dense_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=10,
        num_experts_per_tok=3,
        num_shared_experts=1,
        sliding_window=5,
        global_attn_every_n_layers=2,
        mup_enabled=True,
        tie_word_embeddings=False,
    ),
    "mha-tied-0dense-top2": dict(
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_dense_layers=0,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=12,
        num_experts=7,
        num_experts_per_tok=2,
        num_shared_experts=1,
        sliding_window=3,
        global_attn_every_n_layers=3,
        mup_enabled=False,
        tie_word_embeddings=True,
    ),
    "mqa-2dense-top4-2shared": dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=16,
        num_hidden_layers=5,
        num_dense_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=9,
        num_experts_per_tok=4,
        num_shared_experts=2,
        sliding_window=6,
        global_attn_every_n_layers=3,
        mup_enabled=True,
        tie_word_embeddings=False,
    ),
}


# The other families' switches, as (family, config): windows shorter than the prompts, tied and untied
# heads, GQA / MQA, dense layers between MoE ones, top-k with and without renormalisation, and expert
# counts (7, 9) that no shard count divides.
FAMILY_PARITY_CONFIGS: dict[str, tuple[str, dict]] = {
    "mixtral-gqa-window4-top2": (
        "mixtral",
        dict(
            hidden_size=48,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_local_experts=7,
            num_experts_per_tok=2,
            sliding_window=4,
        ),
    ),
    # sliding window 4 on layers 0 and 2, YaRN over a 16-token original context (prompts reach 45),
    # router bias, sinks and biases non-zero (the writer draws them), a clamp the experts reach
    "gpt-oss-gqa-window4-yarn-top3": (
        "gpt_oss",
        dict(
            hidden_size=48,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            num_local_experts=7,
            num_experts_per_tok=3,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=0.5,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        ),
    ),
    "qwen3-mqa-tied-sparse-step2-top3": (
        "qwen3_moe",
        dict(
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=16,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=12,
            num_experts=9,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=2,  # MoE on layers 1 and 3
            mlp_only_layers=[],
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-gqa-unnormalised-mlponly0": (
        "qwen3_moe",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=7,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[0],  # MoE on layers 1 and 2
        ),
    ),
    # MLA with a low-rank query and interleaved rope, YaRN over a 16-token original context with
    # mscale != mscale_all_dim (cos/sin and the softmax scale both change); 10 experts in 2 groups,
    # each token's top-3 from one
    "deepseek-qlora-interleave-yarn-2groups-top3": (
        "deepseek_v3",
        dict(
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=24,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            first_k_dense_replace=1,
            n_routed_experts=10,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=3,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            q_lora_rank=32,
            kv_lora_rank=24,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=16,
            rope_interleave=True,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 0.707,
            },
        ),
    ),
}


# A skewed checkpoint: expert_bias draws every token to 2 of the 3 hot experts, which the static
# contiguous placement of 8 experts on 4 shards puts on shards 0 (0, 1) and 1 (2).
SKEWED_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=2,
    num_dense_layers=0,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
)
HOT_EXPERTS = (0, 1, 2)


@pytest.fixture(scope="session")
def skewed_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("skewed") / "skewed-model"  # its own metric series
    return write_checkpoint(path, SKEWED_CONFIG, seed=3, hot_experts=HOT_EXPERTS)


@pytest.fixture(scope="module")
def one_compute_thread():
    """Tiny tensors: intra-op threads only add wake-up latency, a lot of it on a busy machine.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_compute_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session; engines join it instead of starting their own.

    It advertises 8 logical CPUs on this 2-core machine so that a router and 4 expert actors fit;
    each actor still runs a single compute thread. Ray's metrics agent serves the Prometheus text of
    every metric on the port it yields (see `metrics_export_port`).
    """
    port = free_port()
    ray.init(
        num_cpus=8,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        _metrics_export_port=port,
    )
    yield port
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_export_port(ray_cluster) -> int:
    return ray_cluster


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every parity config's checkpoint, AFMoE's and the other families'."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {name: write_afmoe_checkpoint(root / name, cfg, seed=1) for name, cfg in PARITY_CONFIGS.items()}
    for name, (family, cfg) in FAMILY_PARITY_CONFIGS.items():
        out[name] = write_checkpoint(root / name, cfg, seed=1, family=family)
    return out


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """A copy of the shipped trained demo model, the default model of every command."""
    return copy_demo_model(tmp_path_factory.mktemp("demo") / "model")


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The reference: transformers' own forward, argmax, recomputed from scratch each step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_reference(
    path: Path, prompts: list[list[int]], new_tokens: int
) -> tuple[torch.Tensor, list[list[int]]]:
    """transformers in fp32: the logits of the first prompt, and every prompt's greedy tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0]
    return logits, [hf_greedy(model, p, new_tokens) for p in prompts]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    """Serve's HTTP proxy on a free loopback port, once per session; apps deploy under their own prefix."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def deploy_app(name: str, options: dict):
    """Deploys the real app (cluster.serve.app:build_app) at /<name>; returns its base URL suffix."""
    from ray import serve

    from cluster.serve.app import build_app

    serve.run(build_app(options), name=name, route_prefix=f"/{name}")
    return f"/{name}"


def small_app(model: Path, **options: object) -> dict:
    """ServeOptions for a small app of `model` on this machine: half a CPU per router and expert actor."""
    return {"model": str(model), "router_cpus": 0.5, "expert_cpus": 0.5, **options}


@contextlib.contextmanager
def served_app(base_url: str, name: str, options: dict) -> Iterator[str]:
    """The real app deployed at /<name> for the duration; yields its URL."""
    from ray import serve

    deploy_app(name, options)
    try:
        yield f"{base_url}/{name}"
    finally:
        serve.delete(name)


def served_model(url: str) -> str:
    """The model name an app serves (the first of /v1/models)."""
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
