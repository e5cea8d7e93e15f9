"""The model-adapter layer: which architecture a config.json selects, what it refuses, where each family's
checkpoint keeps its tensors. Parity with transformers on Ray is tests/test_parity.py; here the engine
core runs in this process (tests/toolkit.py local_core)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, DeepseekV3Config, GptOssConfig, Qwen3MoeForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from cluster.demo import FAMILIES, write_checkpoint
from experts.checkpoint import CheckpointReader
from experts.shard import ExpertShard
from router.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from router.decode_linear import DecodeLinear
from router.deepseek_v3 import LatentAttention
from router.gpt_oss import DEFAULT_THETA
from router.layers import rope_frequencies
from router.rope import RopeScaling
from router.tokenizer import Tokenizer
from router.weights import expert_kind, load_router_model
from tests.conftest import FAMILY_PARITY_CONFIGS, hf_greedy, hf_reference
from tests.toolkit import checkout_cli, local_core

PROMPT = [5, 17, 9, 22, 41, 7, 8, 100, 2, 60, 33, 11, 250, 7, 19]


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: write_checkpoint(root / name, cfg, seed=2, family=family)
        for name, (family, cfg) in FAMILY_PARITY_CONFIGS.items()
    }


def _raw(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_each_family_is_chosen_from_architectures(family_checkpoints) -> None:
    for name, (family, _) in FAMILY_PARITY_CONFIGS.items():
        config = ModelConfig.from_model_dir(family_checkpoints[name])
        assert config.architecture == FAMILIES[family].architecture
        assert config.architecture in SUPPORTED_ARCHITECTURES


def test_an_unsupported_architecture_is_refused_with_the_supported_list(family_checkpoints) -> None:
    raw = _raw(family_checkpoints["mixtral-gqa-window4-top2"]) | {"architectures": ["Glm4MoeForCausalLM"]}
    with pytest.raises(ConfigError, match="unsupported architecture") as err:
        ModelConfig.from_dict(raw)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("quantization_config", {"quant_method": "fp8"}, "quantization_config"),
        ("quantization_config", {"quant_method": "mxfp4"}, "quantization_config"),  # gpt-oss' published
        (
            "rope_parameters",
            {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0},
            "rope_parameters.rope_type 'longrope'",
        ),
        ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic'"),
        ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ],
)
@pytest.mark.parametrize("name", list(FAMILY_PARITY_CONFIGS))
def test_unsupported_fields_are_a_load_error_naming_them(family_checkpoints, name, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(_raw(family_checkpoints[name]) | {field: value})


@pytest.mark.parametrize("name", [n for n, (f, _) in FAMILY_PARITY_CONFIGS.items() if f != "gpt_oss"])
def test_attention_biases_are_refused_outside_gpt_oss(family_checkpoints, name) -> None:
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_dict(_raw(family_checkpoints[name]) | {"attention_bias": True})


def test_qwen3_sliding_window_is_refused(family_checkpoints) -> None:
    raw = _raw(family_checkpoints["qwen3-gqa-unnormalised-mlponly0"])
    with pytest.raises(ConfigError, match="use_sliding_window"):
        ModelConfig.from_dict(raw | {"use_sliding_window": True, "sliding_window": 8})


@pytest.mark.parametrize("name", [n for n, (f, _) in FAMILY_PARITY_CONFIGS.items() if f == "qwen3_moe"])
def test_qwen3_moe_layers_are_the_ones_transformers_builds(family_checkpoints, name) -> None:
    reference = Qwen3MoeForCausalLM.from_pretrained(family_checkpoints[name])
    sparse = [
        i for i, layer in enumerate(reference.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)
    ]
    assert 0 < len(sparse) < len(reference.model.layers)
    assert ModelConfig.from_model_dir(family_checkpoints[name]).moe_layers == sparse


def _fused_copy(checkpoint: Path, target: Path) -> Path:
    """The model as transformers holds it in memory (fused experts, `mlp.gate`), written as is."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    target.mkdir()
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight" or not model.config.tie_word_embeddings
    }
    save_file(state, target / "model.safetensors")
    (target / "config.json").write_text((checkpoint / "config.json").read_text())
    return target


@pytest.mark.parametrize("name", [n for n, (f, _) in FAMILY_PARITY_CONFIGS.items() if f != "gpt_oss"])
def test_fused_and_per_expert_layouts_give_the_same_tokens(family_checkpoints, tmp_path, name) -> None:
    torch.set_num_threads(1)
    written = family_checkpoints[name]
    fused = _fused_copy(written, tmp_path / "fused")
    written_names, fused_names = (
        set(load_file(written / "model.safetensors")),
        set(load_file(fused / "model.safetensors")),
    )
    assert not any(n.endswith("experts.gate_up_proj") for n in written_names)  # save_pretrained: per expert
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in fused_names)
    reference = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    expected = hf_greedy(reference, PROMPT, 12)
    for path in (written, fused):
        core = local_core(path, shards=3, max_num_batched_tokens=8)
        [seq] = core.generate([PROMPT], [_greedy(12)])
        assert seq.output_ids == expected, path.name


def _greedy(tokens: int):
    from router.sampling import SamplingParams

    return SamplingParams(max_tokens=tokens, ignore_eos=True)


def test_mixtral_shard_reads_only_its_experts(family_checkpoints, tmp_path) -> None:
    written = family_checkpoints["mixtral-gqa-window4-top2"]
    config = ModelConfig.from_model_dir(written)
    owned = [1, 4, 6]
    tensors = load_file(written / "model.safetensors")
    unowned = re.compile(rf"\.experts\.(?!({'|'.join(map(str, owned))})\.)")
    kept = {n: t for n, t in tensors.items() if not unowned.search(n)}
    assert len(kept) < len(tensors)
    save_file(kept, tmp_path / "model.safetensors")
    layers = config.moe_layers
    shard = ExpertShard.load(CheckpointReader(tmp_path), layers, [owned] * len(layers), torch.float32)
    inter = config.moe_intermediate_size
    for local, expert in enumerate(owned):
        prefix = f"model.layers.0.block_sparse_moe.experts.{expert}"
        assert torch.equal(shard.gate_up[0][local, :inter], tensors[f"{prefix}.w1.weight"])
        assert torch.equal(shard.gate_up[0][local, inter:], tensors[f"{prefix}.w3.weight"])
        assert torch.equal(shard.down[0][local], tensors[f"{prefix}.w2.weight"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_demo_model_arch_writes_a_servable_checkpoint_with_a_tokenizer(tmp_path, family) -> None:
    target = tmp_path / family
    run = checkout_cli("demo-model", str(target), "--arch", family)
    assert run.returncode == 0, run.stderr
    config = ModelConfig.from_model_dir(target)
    assert config.architecture == FAMILIES[family].architecture
    assert Tokenizer.from_model_dir(target).encode("hello world")
    assert (target / "tokenizer.json").is_file()


def test_demo_model_refuses_an_unknown_arch(tmp_path) -> None:
    run = checkout_cli("demo-model", str(tmp_path / "m"), "--arch", "llama")
    assert run.returncode == 2
    assert "unknown --arch 'llama'" in run.stderr and "qwen3_moe" in run.stderr
    assert not (tmp_path / "m").exists()


GPT_OSS = "gpt-oss-gqa-window4-yarn-top3"


def test_gpt_oss_experts_load_from_the_interleaved_layout_and_compute_as_transformers(
    family_checkpoints,
) -> None:
    """save_pretrained writes GPT-OSS's experts fused only ([E, H, 2I], gate and up in alternating
    columns, with biases): a shard of some of them computes what transformers' experts module does."""
    written = family_checkpoints[GPT_OSS]
    reader = CheckpointReader(written)
    names = reader.names()
    assert not any(re.search(r"\.experts\.\d+\.", n) for n in names)
    config = ModelConfig.from_model_dir(written)
    prefix = "model.layers.1.mlp.experts"
    hidden, inter = config.hidden_size, config.moe_intermediate_size
    assert reader.shape(f"{prefix}.gate_up_proj") == (config.num_experts, hidden, 2 * inter)
    owned = [1, 4, 6]
    layers = config.moe_layers
    shard = ExpertShard.load(reader, layers, [owned] * len(layers), torch.float32, expert_kind(config))
    reference = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    experts = reference.model.layers[1].mlp.experts
    assert experts.gate_up_proj_bias.abs().min() > 0 and experts.limit == 0.5
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(12, hidden, generator=gen) * 4  # large enough to reach the clamp
    local = torch.stack([torch.randperm(len(owned), generator=gen)[:2] for _ in range(12)])
    weights = torch.rand(12, 2, generator=gen)
    with torch.no_grad():
        expected = experts(rows, torch.tensor(owned)[local], weights)
    assert torch.allclose(shard.forward(1, rows, local, weights), expected, atol=1e-5)


def test_gpt_oss_experts_move_into_new_slots_with_their_biases(family_checkpoints) -> None:
    """A rebalancing's reslot (copy held experts, read the rest) builds what a fresh load would."""
    written = family_checkpoints[GPT_OSS]
    reader, config = CheckpointReader(written), ModelConfig.from_model_dir(written)
    kind, layers = expert_kind(config), config.moe_layers
    live = ExpertShard.load(reader, layers, [[1, 4]] * len(layers), torch.float32, kind)
    moved, read = live.reslot(reader, layers, [[1, 4]] * len(layers), [[4, 0, 1]] * len(layers))
    fresh = ExpertShard.load(reader, layers, [[4, 0, 1]] * len(layers), torch.float32, kind)
    assert (
        moved.kind == kind
        and read == ExpertShard.load(reader, layers, [[0]] * len(layers), torch.float32, kind).nbytes()
    )
    for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
        for got, want in zip(getattr(moved, name), getattr(fresh, name), strict=True):
            assert torch.equal(got, want), name


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "rope",
    [
        YARN | {"beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
        YARN | {"beta_fast": 8.0, "beta_slow": 2.0},  # truncated correction range (the default)
        YARN | {"mscale": 1.0, "mscale_all_dim": 0.5},
        YARN | {"attention_factor": 0.8, "rope_theta": 150000.0},
    ],
)
def test_yarn_frequencies_and_scale_are_transformers_own(family_checkpoints, rope) -> None:
    raw = _raw(family_checkpoints[GPT_OSS]) | {"head_dim": 32, "rope_parameters": rope}
    expected_freq, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig.from_dict(raw))
    config = ModelConfig.from_dict(raw)
    freq, scale = rope_frequencies(config)
    assert torch.equal(freq, expected_freq) and scale == pytest.approx(expected_scale, rel=1e-12)
    default = rope_frequencies(dataclasses.replace(config, rope=RopeScaling()))
    assert scale != 1.0 and not torch.equal(freq, default[0])


def test_gpt_oss_legacy_rope_scaling_is_read_as_yarn(family_checkpoints) -> None:
    """Published gpt-oss configs carry YaRN as `rope_scaling` beside a top-level rope_theta."""
    raw = _raw(family_checkpoints[GPT_OSS])
    legacy = raw | {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": raw["rope_parameters"]}
    assert ModelConfig.from_dict(legacy) == ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict(raw).rope.rope_type == "yarn"
    unset = {k: v for k, v in raw.items() if k != "rope_parameters"}  # GptOssConfig's default YaRN
    expected = ROPE_INIT_FUNCTIONS["yarn"](GptOssConfig.from_dict(unset))
    config = ModelConfig.from_dict(unset)
    freq, scale = rope_frequencies(config)
    assert config.rope_theta == DEFAULT_THETA and config.rope.factor == 32.0
    assert torch.equal(freq, expected[0]) and scale == pytest.approx(expected[1], rel=1e-12)


def test_mixtral_with_yarn_rope_equals_transformers(tmp_path) -> None:
    """The other families take YaRN through the same rope code."""
    torch.set_num_threads(1)
    _, cfg = FAMILY_PARITY_CONFIGS["mixtral-gqa-window4-top2"]
    yarn = {"max_position_embeddings": 64, "rope_parameters": YARN}
    written = write_checkpoint(tmp_path / "m", cfg | yarn, seed=3, family="mixtral")
    assert ModelConfig.from_model_dir(written).rope.rope_type == "yarn"
    reference = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
    core = local_core(written, shards=2, max_num_batched_tokens=8)
    [seq] = core.generate([PROMPT], [_greedy(12)])
    assert seq.output_ids == hf_greedy(reference, PROMPT, 12)


# DeepSeek-V3's other switches, checked in this process (the Ray parity config is in FAMILY_PARITY_CONFIGS):
# q_proj instead of a low-rank query, rope on halves, weights not renormalised, 9 experts in 3 groups
# of which 2 are kept, 2 shared experts, tied embeddings.
DEEPSEEK_Q_PROJ = dict(
    hidden_size=48,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    first_k_dense_replace=1,
    n_routed_experts=9,
    n_group=3,
    topk_group=2,
    num_experts_per_tok=3,
    n_shared_experts=2,
    routed_scaling_factor=1.5,
    norm_topk_prob=False,
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=12,
    rope_interleave=False,
    tie_word_embeddings=True,
)


def test_deepseek_q_proj_variant_matches_transformers_through_a_latent_cache(tmp_path) -> None:
    torch.set_num_threads(1)
    path = write_checkpoint(tmp_path / "ds", DEEPSEEK_Q_PROJ, seed=3, family="deepseek_v3")
    prompts = [PROMPT, [300, 4], list(range(20, 41))]
    ref_logits, ref_tokens = hf_reference(path, prompts, 16)
    core = local_core(path, shards=3, max_num_batched_tokens=8)  # chunked prefills beside decodes
    latent = DEEPSEEK_Q_PROJ["kv_lora_rank"] + DEEPSEEK_Q_PROJ["qk_rope_head_dim"]
    slots = core.cache.full.num_blocks * core.cache.block_size
    assert [[tuple(t.shape) for t in layer] for layer in core.cache.entries] == [[(slots, 1, latent)]] * 3
    assert core.cache.nbytes == 3 * slots * latent * 4  # fp32: nothing but the latent per token and layer
    assert (core.prefill_logits(PROMPT) - ref_logits).abs().max().item() < 1e-4
    seqs = core.generate(prompts, [_greedy(16)] * len(prompts))
    assert [s.output_ids for s in seqs] == ref_tokens


# the published DeepSeek-V3 config.json's rope (the legacy field), and the same with mscale != mscale_all_dim
PUBLISHED_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.mark.parametrize("scaling", [PUBLISHED_YARN, PUBLISHED_YARN | {"mscale_all_dim": 0.707}])
def test_deepseek_yarn_frequencies_and_softmax_scale_are_transformers_own(family_checkpoints, scaling):
    """Rope over qk_rope_head_dim, cos/sin scaled by mscale / mscale_all_dim, and the softmax scale
    times mscale(factor, mscale_all_dim)**2, as transformers' DeepseekV3Attention has it."""
    raw = _raw(family_checkpoints["deepseek-qlora-interleave-yarn-2groups-top3"])
    raw = {k: v for k, v in raw.items() if k != "rope_parameters"} | {
        "rope_theta": 10000.0,
        "rope_scaling": scaling,
        "max_position_embeddings": 163840,
    }
    config = ModelConfig.from_dict(raw)
    assert config.rope.rope_type == "yarn" and config.head_dim == raw["qk_rope_head_dim"]
    reference = DeepseekV3Config.from_dict(raw)
    expected_freq, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](reference)
    freq, scale = rope_frequencies(config)
    torch.testing.assert_close(freq, expected_freq)
    assert scale == pytest.approx(expected_scale)
    expected_softmax = DeepseekV3Attention(reference, layer_idx=0).scaling
    assert LatentAttention(config, 0).scale == pytest.approx(expected_softmax)
    assert expected_softmax > 1.2 * (raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"]) ** -0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_layer_freq": 2}, "moe_layer_freq 2"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"n_group": 3}, "n_group 3"),
        ({"topk_group": 3}, "topk_group 3"),
        ({"n_group": 5, "topk_group": 1}, "fewer experts than num_experts_per_tok"),
        ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
        ({"scoring_func": "softmax"}, "scoring_func 'softmax'"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim 5"),
    ],
)
def test_deepseek_fields_it_does_not_implement_are_load_errors(family_checkpoints, change, message) -> None:
    raw = _raw(family_checkpoints["deepseek-qlora-interleave-yarn-2groups-top3"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(raw | change)


@pytest.mark.parametrize("name", list(FAMILY_PARITY_CONFIGS))
def test_router_linears_hold_the_checkpoint_in_the_memory_order_their_gemm_reads_fastest(
    family_checkpoints, name
) -> None:
    """fp32 on the CPU: [in, out] memory behind each Linear's [out, in] weight (experts/gemm_layout.py),
    and every Linear a DecodeLinear; bf16: the checkpoint's own order, plain Linears. The values are
    the checkpoint's either way."""
    path = family_checkpoints[name]
    reader, config = CheckpointReader(path), ModelConfig.from_model_dir(path)
    tensors = load_file(path / "model.safetensors")
    for dtype, transposed in ((torch.float32, True), (torch.bfloat16, False)):
        model = load_router_model(reader, config, dtype, torch.device("cpu"))
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        compared = 0
        for module_name, module in linears.items():
            assert isinstance(module, DecodeLinear) is transposed, module_name
            weight = module.weight
            assert weight.T.is_contiguous() is transposed and weight.is_contiguous() is not transposed
            stored = tensors.get(f"{module_name}.weight")
            if stored is not None:  # else stored under an alias
                assert torch.equal(weight, stored.to(dtype)), module_name
                compared += 1
        assert compared >= len(linears) // 2 > 0
