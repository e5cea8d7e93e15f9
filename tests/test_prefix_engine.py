"""The engine in one process (LocalExperts) with prefix caching and preemption: same tokens as without."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AfmoeForCausalLM

from experts.checkpoint import CheckpointReader
from experts.placement import ModelPlacement
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.engine_core import EngineCore, default_cache_bytes
from router.exchange import LocalExperts
from router.kv_cache import KVCache
from router.sampling import SamplingParams
from router.scheduler import SchedulerConfig
from router.weights import load_router_model
from tests.conftest import PARITY_CONFIGS, hf_greedy

BLOCK = 4


def local_core(
    model_dir: Path,
    *,
    prefix_caching: bool = True,
    cache_bytes: int | None = None,
    max_num_seqs: int = 8,
    max_model_len: int = 256,
    max_num_batched_tokens: int = 64,
    block_size: int = BLOCK,
) -> EngineCore:
    config = ModelConfig.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    cpu, dtype = torch.device("cpu"), torch.float32
    placement = ModelPlacement.uniform(len(config.moe_layers), config.num_experts, 2)
    shards = [ExpertShard.load(reader, config.moe_layers, placement.slots_of(s), dtype) for s in range(2)]
    budget = cache_bytes or default_cache_bytes(
        config, max_num_seqs, max_model_len, block_size, dtype, max_num_batched_tokens
    )
    cache = KVCache(config, budget, max_num_seqs, block_size, dtype, cpu, max_num_batched_tokens)
    model = load_router_model(reader, config, dtype, cpu)
    scheduler = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len, 64, prefix_caching)
    return EngineCore(config, model, cache, LocalExperts(shards, placement), scheduler)


def _generate(core: EngineCore, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    return [s.output_ids for s in core.generate(prompts, params)]


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_a_reused_prefix_longer_than_the_window_gives_the_tokens_of_transformers(checkpoints, name) -> None:
    torch.set_num_threads(1)
    window = PARITY_CONFIGS[name]["sliding_window"]
    core = local_core(checkpoints[name], max_num_batched_tokens=8)
    prefix = [(7 * i + 3) % 200 + 1 for i in range(6 * window)]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    core.generate([[*prefix, 9, 10, 11]], [greedy])
    prompt = [*prefix, 40, 41]
    [seq] = core.generate([prompt], [greedy])
    assert seq.cached_tokens >= len(prefix) - BLOCK and seq.cached_tokens > window
    model = AfmoeForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    assert seq.output_ids == hf_greedy(model, prompt, 12)


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    shared = [(11 * i + 5) % 500 for i in range(150)]  # longer than the demo model's window of 64
    prompts = [[*shared[:n], *range(20 + i, 30 + 2 * i)] for i, n in enumerate([150, 150, 97, 0, 150, 64])]
    params = [
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=36, temperature=0.8, top_k=20, seed=6, ignore_eos=True),
        SamplingParams(max_tokens=25, ignore_eos=True),
        SamplingParams(max_tokens=33, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=20, ignore_eos=True),
    ]
    return prompts, params


def test_same_tokens_with_prefix_caching_on_off_and_under_preemption(demo_model) -> None:
    """Greedy and seeded sampling; requests in two waves, so the second finds the first's blocks."""
    torch.set_num_threads(1)
    prompts, params = _workload()
    config = ModelConfig.from_model_dir(demo_model)
    block_bytes = 2 * 16 * config.num_key_value_heads * config.head_dim * 4
    full_layers = sum(not config.is_sliding(i) for i in range(config.num_hidden_layers))
    sliding_layers = config.num_hidden_layers - full_layers
    tiny = (sliding_layers * (8 * 6 + 4) + full_layers * 16) * block_bytes  # 16 full blocks of 16 tokens
    runs = {}
    for label, options in {
        "off": {"prefix_caching": False},
        "on": {},
        "tiny": {"cache_bytes": tiny},
        "tiny-off": {"cache_bytes": tiny, "prefix_caching": False},
    }.items():
        core = local_core(demo_model, block_size=16, **options)
        first = _generate(core, prompts[:3], params[:3])
        runs[label] = (first + _generate(core, prompts[3:], params[3:]), core.scheduler.stats)
        if label.startswith("tiny"):
            assert core.cache.full.num_blocks == 16
    reference = runs["off"][0]
    for label, (tokens, _) in runs.items():
        assert tokens == reference, label
    assert runs["off"][1].prefix_hit_tokens == 0
    assert runs["on"][1].prefix_hit_tokens >= 128 and runs["on"][1].preemptions == 0
    assert runs["tiny"][1].preemptions > 0 and runs["tiny-off"][1].preemptions > 0


def test_at_a_fixed_budget_four_times_the_sequences_run_at_once(demo_model) -> None:
    """max_model_len 4096, answers of 128 tokens: reserving max_model_len per sequence (the engine before
    blocks on demand) fits 4 sequences in this budget by construction; on demand fits >= 16."""
    torch.set_num_threads(1)
    config = ModelConfig.from_model_dir(demo_model)
    reserved = 4
    budget = default_cache_bytes(config, reserved, 4096, 16, torch.float32, 2048)
    core = local_core(
        demo_model,
        cache_bytes=budget,
        max_num_seqs=32,
        max_model_len=4096,
        max_num_batched_tokens=2048,
        block_size=16,
    )
    prompts = [[(13 * i + j) % 500 for j in range(20)] for i in range(32)]
    params = [SamplingParams(max_tokens=128, ignore_eos=True)] * 32
    outputs = _generate(core, prompts, params)
    assert all(len(tokens) == 128 for tokens in outputs)
    assert core.scheduler.stats.max_running >= 4 * reserved
