"""Same checkpoint, same tokens: the engine against transformers' own model of each family in fp32.

Every config (AFMoE's PARITY_CONFIGS, Mixtral's, Qwen3-MoE's, DeepSeek-V3's and GPT-OSS's
FAMILY_PARITY_CONFIGS) runs on a real Ray cluster with 1, 2 and 4 expert actors over gloo, with
two-batch overlap on and, for 2 actors, without. The AFMoE configs cover
muP on/off, 0-2 dense layers, tied and untied embeddings, MHA / GQA / MQA, sliding windows shorter
than the prompts, top-k 2-4, and expert counts (7, 9, 10) that no shard count divides. The GPT-OSS
one adds attention biases and sinks, YaRN rope, a router bias and clamped SwiGLU experts with biases;
the DeepSeek-V3 one latent attention with YaRN (its mscale on the softmax scale as well).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AfmoeForCausalLM

from cluster.engine import Engine
from tests.conftest import FAMILY_PARITY_CONFIGS, PARITY_CONFIGS, hf_greedy, hf_reference

PROMPTS = [
    [5, 17, 9, 22, 41, 7, 8, 100, 2, 60, 33, 11, 250, 7, 19],  # longer than every sliding window
    [300, 4],
    [9] * 9,
    list(range(20, 41)),
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def references(checkpoints):
    return {name: hf_reference(path, PROMPTS, NEW_TOKENS) for name, path in checkpoints.items()}


@pytest.mark.parametrize(("shards", "overlap"), [(s, o) for o in (True, False) for s in (1, 2, 4)])
@pytest.mark.parametrize("name", [*PARITY_CONFIGS, *FAMILY_PARITY_CONFIGS])
def test_engine_matches_transformers(ray_cluster, checkpoints, references, name, shards, overlap):
    ref_logits, ref_tokens = references[name]
    placement = "round_robin" if shards == 2 else "contiguous"
    with Engine(
        checkpoints[name],
        expert_shards=shards,
        placement=placement,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
        overlap=overlap,
        max_num_batched_tokens=8,  # forces chunked prefill mixed with decodes (split into micro-batches)
    ) as engine:
        logits = engine.logits(PROMPTS[0])
        assert logits.shape == ref_logits.shape
        assert (logits - ref_logits).abs().max().item() < 1e-4
        completions = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        split_steps = engine.stats()["split_steps"]
    assert [c.token_ids for c in completions] == ref_tokens
    assert (split_steps > 0) == overlap
    assert all(c.finish_reason == "length" for c in completions)


def test_redundant_experts_match_transformers(ray_cluster, checkpoints, references):
    """10 experts + 7 replicas on 2 shards: tokens split over replicas, merged once per rank."""
    name = "mup-gqa-untied-1dense"
    ref_logits, ref_tokens = references[name]
    with Engine(
        checkpoints[name],
        expert_shards=2,
        redundant_experts=7,
        eplb=False,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
        max_num_batched_tokens=8,
    ) as engine:
        info = engine.info()
        assert sorted(e["experts"] for e in info["experts"]) == [8, 9]  # slots per shard
        assert info["dedicated_cores"] is False  # half-CPU actors, and a cluster told of more CPUs than cores
        logits = engine.logits(PROMPTS[0])
        completions = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert [c.token_ids for c in completions] == ref_tokens


def test_online_rebalancing_mid_stream_changes_no_token(ray_cluster, checkpoints, references):
    """A rebalance every 0.05 s while the greedy streams decode: the placement changes between steps,
    the tokens stay transformers' own."""
    name = "mup-gqa-untied-1dense"
    _, ref_tokens = references[name]
    with Engine(
        checkpoints[name],
        expert_shards=2,
        placement="round_robin",
        redundant_experts=3,
        eplb_interval_s=0.05,
        router_cpus=0.5,
        expert_cpus=0.5,
        dtype="float32",
        max_num_batched_tokens=8,
    ) as engine:
        for _ in range(5):  # a rebalance takes effect only between two steps: while streams decode
            completions = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert [c.token_ids for c in completions] == ref_tokens
            info = engine.info()
            if info["eplb"]["rebalances"] >= 2:
                break
    assert info["eplb"]["rebalances"] >= 2
    versions = {e["version"] for e in info["experts"]}
    assert versions == {info["eplb"]["rebalances"]}  # every rank serves the router's latest placement
    for before, after in info["eplb"]["imbalance"]:
        assert after < before


def test_rank_without_tokens(ray_cluster, checkpoints, references):
    """One token with top-2 routing on 4 shards: at least two expert ranks receive nothing."""
    name = "mha-tied-0dense-top2"
    model = AfmoeForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    with Engine(
        checkpoints[name], expert_shards=4, router_cpus=0.5, expert_cpus=0.5, dtype="float32"
    ) as engine:
        assert engine.generate([[42]], max_new_tokens=8, ignore_eos=True)[0].token_ids == hf_greedy(
            model, [42], 8
        )
