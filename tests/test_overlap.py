"""Two-batch overlap in one process: where a step is cut, how the passes take turns, and that a
split step computes what the unsplit one does (against transformers, fp32)."""

from __future__ import annotations

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
from router.micro_batch import interleave, split_point
from router.sampling import SamplingParams
from router.scheduler import SchedulerConfig
from router.weights import expert_kind, load_router_model
from tests.conftest import hf_greedy


@pytest.mark.parametrize(
    ("lengths", "min_tokens", "cut"),
    [
        ([1, 1, 1, 1], 2, 2),
        ([1, 1, 1], 2, 1),  # 1 | 2 and 2 | 1 are as even; the first wins
        ([8, 1, 1, 1, 1], 2, 1),
        ([1, 1, 1, 1, 8], 2, 4),
        ([3, 3], 2, 1),
        ([5], 2, None),  # one sequence is never cut
        ([1, 1, 1], 4, None),  # too few tokens
        ([2, 2], 4, 1),
    ],
)
def test_split_point_balances_tokens(lengths, min_tokens, cut):
    assert split_point(lengths, min_tokens) == cut


def test_interleave_runs_the_passes_in_turn():
    trace: list[str] = []

    def one_pass(name: str, layers: int):
        for layer in range(layers):
            trace.append(f"{name}{layer}")
            yield
        return name.upper()

    assert interleave([one_pass("a", 3), one_pass("b", 3)]) == ["A", "B"]
    assert trace == ["a0", "b0", "a1", "b1", "a2", "b2"]


def _core(model_dir, overlap: bool, shards: int = 2) -> EngineCore:
    config = ModelConfig.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    cpu, dtype = torch.device("cpu"), torch.float32
    placement = ModelPlacement.uniform(len(config.moe_layers), config.num_experts, shards)
    loaded = [
        ExpertShard.load(reader, config.moe_layers, placement.slots_of(s), dtype, expert_kind(config))
        for s in range(shards)
    ]
    cache = KVCache(config, default_cache_bytes(config, 8, 128, 4, dtype), 8, 4, dtype, cpu)
    model = load_router_model(reader, config, dtype, cpu)
    scheduler = SchedulerConfig(8, 7, 128, 16)  # 7-token steps: chunked prefills beside decodes
    return EngineCore(
        config,
        model,
        cache,
        LocalExperts(loaded, placement),
        scheduler,
        overlap=overlap,
        overlap_min_tokens=2,
    )


PROMPTS = [[5, 17, 9, 22, 41, 7, 8, 100, 2, 60, 33], [300, 4], [9] * 6, list(range(20, 29))]


@pytest.mark.parametrize("name", ["mup-gqa-untied-1dense", "mqa-2dense-top4-2shared"])
def test_split_steps_match_transformers_and_the_unsplit_engine(checkpoints, name):
    torch.set_num_threads(1)
    reference = AfmoeForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
    want = [hf_greedy(reference, p, 10) for p in PROMPTS]
    params = [SamplingParams(max_tokens=10, ignore_eos=True)] * len(PROMPTS)
    results = {}
    for overlap in (True, False):
        core = _core(checkpoints[name], overlap)
        seqs = core.generate(PROMPTS, params)
        results[overlap] = [s.output_ids for s in seqs], core.totals
    assert results[True][0] == want == results[False][0]
    split, plain = results[True][1], results[False][1]
    assert split.split_steps >= split.steps // 2 and plain.split_steps == 0
    assert split.steps == plain.steps
