"""Prompts of 16k+ tokens on the demo model on CPU: chunked prefill, one window of sliding blocks, reuse."""

from __future__ import annotations

import pytest
import torch

from cluster.engine import Engine
from router.sampling import SamplingParams
from tests.test_prefix_engine import local_core

PROMPT = 16_400
OPTIONS = {"max_num_seqs": 2, "max_model_len": 17_000, "max_num_batched_tokens": 2048, "block_size": 16}


@pytest.mark.slow
def test_a_16k_prompt_runs_and_its_cached_prefix_gives_the_same_tokens(demo_model) -> None:
    torch.set_num_threads(1)
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = [(7 * i + i // 97) % 500 + 5 for i in range(PROMPT)]
    follow_up = [*prompt[:16_384], *range(40, 60)]
    cached = local_core(demo_model, **OPTIONS)
    [first] = cached.generate([prompt], [greedy])
    assert len(first.output_ids) == 8 and first.cached_tokens == 0
    sliding = cached.cache.sliding.num_blocks
    assert sliding < PROMPT // 16  # the sliding layers never held the whole prompt
    [second] = cached.generate([follow_up], [greedy])
    assert second.cached_tokens == 16_384
    [reference] = local_core(demo_model, prefix_caching=False, **OPTIONS).generate([follow_up], [greedy])
    assert second.output_ids == reference.output_ids


@pytest.mark.slow
def test_the_default_options_take_a_16k_prompt(ray_cluster, demo_model) -> None:
    """No max_model_len or KV budget given: the model's own context (32,768) and room for it."""
    torch.set_num_threads(1)
    prompt = [(5 * i + i // 89) % 700 + 5 for i in range(PROMPT)]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    [reference] = local_core(demo_model, **OPTIONS).generate([prompt], [greedy])
    with Engine(demo_model, expert_shards=1, router_cpus=0.5, expert_cpus=0.5) as engine:
        [completion] = engine.generate([prompt], max_new_tokens=6, ignore_eos=True)
    assert completion.token_ids == reference.output_ids
