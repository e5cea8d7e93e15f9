"""`moe-cluster plan` against hand computations, and its parameter accounting against transformers itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AfmoeConfig, AfmoeForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from cluster.cli.main import main
from cluster.planner import sizes
from cluster.planner.models import load_model
from cluster.planner.plan import GB, RESERVE_BYTES, Hardware, PlanError, Request, make_plan
from router.config import ModelConfig
from tests.conftest import FAMILY_PARITY_CONFIGS, PARITY_CONFIGS

REPO = Path(__file__).resolve().parents[1]
LARGE_MOE_LAYERS, LARGE_HIDDEN = 54, 3072


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_trinity_large_sizes_by_hand(capsys):
    plan = plan_json(capsys, "--model", "trinity-large", "--gpus", "8")
    expert = 3 * LARGE_HIDDEN * LARGE_HIDDEN * 2
    assert plan["model"]["expert_bytes"] == expert == 56_623_104  # 56.6 MB
    routed = LARGE_MOE_LAYERS * 256 * expert
    assert plan["model"]["routed_expert_bytes"] == routed
    assert round(routed / GB) == 783
    assert 395e9 < plan["model"]["parameters"] < 402e9  # "~398B parameters"
    assert 12e9 < plan["model"]["active_parameters_per_token"] < 14e9  # "~13B active"

    assert plan["kv"]["bytes_per_token_per_layer"] == 2 * 8 * 128 * 2 == 4096  # 4 KiB
    # 15 full layers x 8192 tokens + 45 sliding layers x a 4096-token ring (window-1 in 16-token blocks)
    per_seq = (15 * 8192 + 45 * 4096) * 4096
    assert plan["kv"]["bytes_per_sequence"] == per_seq
    assert round(per_seq / GB, 2) == 1.26

    # 7 shards: 256 = 4 x 37 + 3 x 36 experts, each expert across 54 layers
    assert plan["layout"] == {
        "gpus": 8,
        "expert_shards": 7,
        "min_gpus": 8,
        "nodes": 1,
        "experts_per_shard": 37,
    }
    assert plan["memory_per_gpu"]["expert_shard_bytes"] == 37 * LARGE_MOE_LAYERS * expert

    linear = 60 * (3 * 3072 * 6144 + 2 * 3072 * 1024) + 6 * 3 * 3072 * 12288  # attention, dense MLPs
    linear += 54 * expert // 2 + 54 * 256 * 3072 + 200192 * 3072  # shared experts, gates, LM head
    router = linear * 2 + (200192 * 3072 + 60 * (4 * 3072 + 2 * 128) + 3072) * 2 + 54 * 256 * 4
    assert plan["memory_per_gpu"]["router_weights_bytes"] == router
    usable = 141e9 * 0.9 - RESERVE_BYTES
    assert plan["kv"]["sequences_fit"] == math.floor((usable - router) / per_seq) == 87


def test_trinity_large_fp8_halves_the_experts(capsys):
    plan = plan_json(capsys, "--model", "trinity-large", "--gpus", "5", "--dtype", "fp8")
    assert round(plan["model"]["routed_expert_bytes"] / GB) == 391
    # one expert over 54 layers is 1.53 GB in fp8: 81 fit in 124.75 GB, so 4 shards of <= 64 experts
    assert plan["layout"]["min_gpus"] == 5
    assert plan["memory_per_gpu"]["expert_shard_bytes"] == 64 * 54 * 3 * 3072 * 3072


def test_trinity_mini_sizes_by_hand(capsys):
    plan = plan_json(capsys, "--model", "trinity-mini", "--gpus", "2", "--max-model-len", "8192")
    expert = 3 * 2048 * 1024 * 2
    assert plan["model"]["routed_expert_bytes"] == 30 * 128 * expert == 48_318_382_080  # 48.3 GB
    assert 25e9 < plan["model"]["parameters"] < 27e9  # "26B"
    assert 2.5e9 < plan["model"]["active_parameters_per_token"] < 3.5e9  # "3B active"
    assert plan["kv"]["bytes_per_token_per_layer"] == 2 * 4 * 128 * 2 == 2048
    assert plan["kv"]["bytes_per_sequence"] == (8 * 8192 + 24 * 2048) * 2048  # 0.23 GB
    assert plan["exchange"]["rows_per_token_per_layer_expected"] == 1.0  # one shard holds every expert


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parameter_count_equals_transformers(name):
    model = AfmoeForCausalLM(AfmoeConfig(**PARITY_CONFIGS[name], vocab_size=300))
    cfg = ModelConfig.from_dict(model.config.to_dict() | {"architectures": ["AfmoeForCausalLM"]})
    p = sizes.count_params(cfg)
    assert p.total == sum(t.numel() for t in model.parameters())
    routed = sum(t.numel() for n, t in model.named_parameters() if ".mlp.experts." in n)
    assert p.routed == routed


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_latent_attention_parameter_count_and_kv_bytes_equal_transformers(q_lora_rank):
    _, config = FAMILY_PARITY_CONFIGS["deepseek-qlora-interleave-yarn-2groups-top3"]
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config | {"q_lora_rank": q_lora_rank}, vocab_size=300))
    cfg = ModelConfig.from_dict(model.config.to_dict() | {"architectures": ["DeepseekV3ForCausalLM"]})
    p = sizes.count_params(cfg)
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert p.total == sum(t.numel() for t in model.parameters()) + biases
    assert p.routed == sum(t.numel() for n, t in model.named_parameters() if ".mlp.experts." in n)
    latent = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    assert cfg.kv_bytes_per_token_layer(sizes.KV_BYTES) == latent * sizes.KV_BYTES
    layers = config["num_hidden_layers"]
    assert sizes.kv_bytes_per_sequence(cfg, 100, 16) == layers * 112 * latent * sizes.KV_BYTES


def test_model_from_a_checkpoint_directory_and_its_config_file(checkpoints):
    path = checkpoints["mup-gqa-untied-1dense"]
    by_dir, source = load_model(str(path))
    assert source == str(path / "config.json")
    assert load_model(str(path / "config.json"))[0] == by_dir
    reader_total = sum(
        t.numel() for t in AfmoeForCausalLM.from_pretrained(path, dtype=torch.float32).parameters()
    )
    assert sizes.count_params(by_dir).total == reader_total


def test_exchange_bytes_and_step_by_hand(capsys):
    plan = plan_json(capsys, "--model", "trinity-large", "--gpus", "8", "--batch", "1")
    ex = plan["exchange"]
    # at most one row per routed expert: 4 x (3072 bf16 + 4 ids and 4 weights in fp32) dispatched
    assert ex["dispatch_bytes_per_token_per_layer_max"] == 4 * (3072 * 2 + 8 * 4) == 24_704
    assert ex["combine_bytes_per_token_per_layer_max"] == 4 * 3072 * 2
    # shards of 37 and 36 experts: P(a shard holds none of a token's 4 experts) = C(256-n, 4) / C(256, 4)
    rows = sum(1 - math.comb(256 - n, 4) / math.comb(256, 4) for n in [37] * 4 + [36] * 3)
    assert ex["rows_per_token_per_layer_expected"] == pytest.approx(rows)
    assert ex["bytes_per_token_per_step"] == pytest.approx(54 * rows * (2 * 3072 * 2 + 32))

    [step] = plan["decode"]
    assert step["batch"] == 1
    # router: every non-expert linear weight plus one sequence's KV at 4096 tokens, over 4.8 TB/s
    router_bytes = plan["memory_per_gpu"]["router_weights_bytes"] - (200192 * 3072 + 60 * 12544 + 3072) * 2
    router_bytes -= 54 * 256 * 4
    assert step["router_ms"] == pytest.approx((router_bytes + 60 * 4096 * 4096) / 4.8e12 * 1e3)
    # exchange: 54 layers x 2 directions x (15 us + bytes over NVLink at 450 GB/s)
    wire = rows * (2 * 3072 * 2 + 32)
    assert step["exchange_ms"] == pytest.approx(54 * (2 * 15e-6 + wire / 450e9) * 1e3)
    assert step["tokens_per_s"] == pytest.approx(1e3 / step["step_ms"])
    assert step["step_ms"] == pytest.approx(step["router_ms"] + step["experts_ms"] + step["exchange_ms"])


def test_shards_on_a_second_node_go_over_the_network(capsys):
    common = ["--model", "trinity-large", "--gpus", "16", "--exchange-latency-us", "0"]
    one_node = plan_json(capsys, *common, "--gpus-per-node", "16")
    two_nodes = plan_json(capsys, *common)
    assert two_nodes["layout"]["nodes"] == 2 and one_node["layout"]["nodes"] == 1
    for near, far in zip(one_node["decode"], two_nodes["decode"], strict=True):
        # 8 of the 15 shards sit on the other node, behind 400 Gbit/s instead of 450 GB/s of NVLink
        assert far["exchange_ms"] == pytest.approx(near["exchange_ms"] * 8 / 15 * 450 / 50)
        assert far["router_ms"] == near["router_ms"]


def test_too_few_gpus_says_how_many_are_needed(capsys):
    assert main(["plan", "--model", "trinity-large", "--gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 8 GPUs" in err and "Traceback" not in err
    assert main(["plan", "--model", "trinity-large", "--gpus", "2", "--gpu-memory", "80"]) == 2
    # 80 GB: 0.9 x 80 - 2 GiB = 69.85 GB holds 22 experts of 3.06 GB: 12 shards + the router
    assert "needs at least 13 GPUs" in capsys.readouterr().err


def test_a_router_that_fits_no_gpu_is_a_clear_error():
    cfg, _ = load_model("trinity-large")
    with pytest.raises(PlanError, match="router's weights"):
        make_plan(cfg, Request(64, hardware=Hardware(gpu_memory_gb=16)))


def test_bad_input_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    cases = [
        ["--model", "no-such-model", "--gpus", "8"],
        ["--model", str(bad), "--gpus", "8"],
        ["--model", "trinity-large", "--gpus", "3"],
        ["--model", "trinity-large", "--gpus", "8", "--gpu-memory-utilization", "1.5"],
    ]
    for args in cases:
        out = subprocess.run(
            [sys.executable, "-m", "cluster.cli.main", "plan", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith("moe-cluster plan: ") and "Traceback" not in out.stderr, out.stderr
    zero = subprocess.run(
        [sys.executable, "-m", "cluster.cli.main", "plan", "--model", "trinity-mini", "--gpus", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert zero.returncode == 2 and "must be > 0" in zero.stderr  # argparse's own usage error


def test_the_planner_does_not_import_torch():
    code = "import sys, cluster.cli.plan; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr


def test_text_report_prints_every_section(capsys):
    assert main(["plan", "--model", "trinity-large", "--gpus", "8"]) == 0
    text = capsys.readouterr().out
    for needle in (
        "router GPU:",
        "expert GPU:",
        "KiB per token per layer",
        "sequences fit",
        "decode step",
        "assumptions:",
    ):
        assert needle in text, needle


def test_trinity_large_reference_deployment_is_what_the_planner_sizes():
    values = yaml.safe_load((REPO / "k8s" / "trinity-large" / "values.yaml").read_text())
    options = values["serve"]["options"]
    [group] = values["rayClusterConfig"]["workerGroupSpecs"]
    cfg, _ = load_model("trinity-large")
    gpus = 1 + options["expert_shards"]
    plan = make_plan(cfg, Request(gpus, max_model_len=options["max_model_len"]))
    assert gpus == plan["layout"]["min_gpus"] == group["gpus"]  # the fewest H200s, one instance per node
    assert options["placement_strategy"] == "STRICT_PACK"
    assert options["kv_cache_bytes"] <= plan["memory_per_gpu"]["router_kv_cache_bytes"]
    assert options["max_num_seqs"] == options["kv_cache_bytes"] // plan["kv"]["bytes_per_sequence"] == 38
    assert options["engine_autoscaling"]["max_replicas"] * gpus <= group["gpus"] * group["maxReplicas"]
