import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AfmoeConfig, AfmoeForCausalLM

import experts.gemv_kernel as gemv_kernel
from experts.checkpoint import CheckpointError, CheckpointReader
from experts.placement import ExpertPlacement
from experts.shard import ExpertShard
from tests.toolkit import tiny_config

NUM_EXPERTS = 10
TOP_K = 3
MOE_LAYERS = [1, 2]  # num_hidden_layers=3 with num_dense_layers=1


def every_layer(ids: list[int]) -> list[list[int]]:
    """The same experts in the slots of every MoE layer."""
    return [ids] * len(MOE_LAYERS)


@dataclass
class Checkpoints:
    model: AfmoeForCausalLM
    per_expert: Path
    fused: Path
    sharded: Path


def _config() -> AfmoeConfig:
    return AfmoeConfig(
        **tiny_config(
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )


def _fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-expert tensors of every MoE layer replaced by stacked gate_up_proj / down_proj."""
    fused = {n: t for n, t in tensors.items() if ".mlp.experts." not in n}
    for layer in MOE_LAYERS:
        prefix = f"model.layers.{layer}.mlp.experts"

        def part(expert: int, name: str, prefix: str = prefix) -> torch.Tensor:
            return tensors[f"{prefix}.{expert}.{name}.weight"]

        experts = range(NUM_EXPERTS)
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([part(e, "gate_proj"), part(e, "up_proj")]) for e in experts]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([part(e, "down_proj") for e in experts])
    return fused


def _write_sharded(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = sorted(tensors)
    half = len(names) // 2
    files = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, model_dir / file)
    weight_map = {n: file for file, part in files.items() for n in part}
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    torch.manual_seed(0)
    model = AfmoeForCausalLM(_config()).eval()
    with torch.no_grad():
        # Default init (std 0.02) gives expert outputs ~1e-4; std 0.2 gives O(1), where 1e-5 means something.
        for layer in MOE_LAYERS:
            experts = model.model.layers[layer].mlp.experts
            experts.gate_up_proj.normal_(0.0, 0.2)
            experts.down_proj.normal_(0.0, 0.2)
    per_expert = tmp_path_factory.mktemp("per_expert")
    model.save_pretrained(per_expert)
    tensors = load_file(per_expert / "model.safetensors")
    assert f"model.layers.{MOE_LAYERS[0]}.mlp.experts.0.gate_proj.weight" in tensors
    fused = tmp_path_factory.mktemp("fused")
    save_file(_fuse(tensors), fused / "model.safetensors")
    sharded = tmp_path_factory.mktemp("sharded")
    _write_sharded(sharded, _fuse(tensors))
    return Checkpoints(model, per_expert, fused, sharded)


def _experts(model: AfmoeForCausalLM, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].mlp.experts


def _routing(tokens: int, gen: torch.Generator, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct experts per token, never expert `skip`, and positive routing weights."""
    candidates = torch.tensor([e for e in range(NUM_EXPERTS) if e != skip])
    scores = torch.rand(tokens, len(candidates), generator=gen)
    index = candidates[scores.topk(TOP_K, dim=1).indices]
    weights = torch.rand(tokens, TOP_K, generator=gen) + 0.1
    return index, weights


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
def test_layouts_load_identical_weights(checkpoints: Checkpoints, strategy: str) -> None:
    placement = ExpertPlacement(NUM_EXPERTS, 3, strategy)
    for shard in range(3):
        ids = placement.experts_of(shard)
        loaded = [
            ExpertShard.load(CheckpointReader(d), MOE_LAYERS, every_layer(ids), torch.float32)
            for d in (checkpoints.per_expert, checkpoints.fused, checkpoints.sharded)
        ]
        for ordinal, layer in enumerate(MOE_LAYERS):
            module = _experts(checkpoints.model, layer)
            for experts in loaded:
                assert torch.equal(experts.gate_up[ordinal], module.gate_up_proj.detach()[ids])
                assert torch.equal(experts.down[ordinal], module.down_proj.detach()[ids])


def test_shard_attributes(checkpoints: Checkpoints) -> None:
    shard = ExpertShard.load(
        CheckpointReader(checkpoints.fused), MOE_LAYERS, every_layer([2, 5, 7]), torch.bfloat16
    )
    assert (shard.num_layers, shard.num_local_experts) == (2, 3)
    assert (shard.hidden_size, shard.intermediate_size) == (32, 16)
    assert shard.gate_up[0].dtype == shard.down[1].dtype == torch.bfloat16
    assert shard.nbytes() == 2 * 3 * (2 * 16 * 32 + 32 * 16) * 2


@pytest.mark.parametrize("strategy", ["contiguous", "round_robin"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_forward_matches_transformers(checkpoints: Checkpoints, strategy: str, layout: str) -> None:
    placement = ExpertPlacement(NUM_EXPERTS, 3, strategy)
    reader = CheckpointReader(getattr(checkpoints, layout))
    shards = [
        ExpertShard.load(reader, MOE_LAYERS, every_layer(placement.experts_of(s)), torch.float32)
        for s in range(3)
    ]
    gen = torch.Generator().manual_seed(1)
    for ordinal, layer in enumerate(MOE_LAYERS):
        hidden = torch.randn(23, 32, generator=gen)
        index, weights = _routing(23, gen, skip=4)
        with torch.no_grad():
            expected = _experts(checkpoints.model, layer)(hidden, index, weights)
        total = torch.zeros_like(hidden)
        for shard, experts in enumerate(shards):
            local_ids = torch.where(placement.shard_of[index] == shard, placement.local_index[index], -1)
            # Like the router's dispatch: only tokens with at least one expert on this shard.
            sent = (local_ids >= 0).any(dim=1).nonzero().squeeze(1)
            partial = experts.forward(ordinal, hidden[sent], local_ids[sent], weights[sent])
            assert partial.shape == (len(sent), 32) and partial.dtype == torch.float32
            total.index_add_(0, sent, partial)
        torch.testing.assert_close(total, expected, rtol=0, atol=1e-5)


def test_forward_single_shard_owning_all(checkpoints: Checkpoints) -> None:
    shard = ExpertShard.load(
        CheckpointReader(checkpoints.per_expert), MOE_LAYERS, every_layer(list(range(10))), torch.float32
    )
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 32, generator=gen)
    index, weights = _routing(40, gen, skip=9)
    with torch.no_grad():
        expected = _experts(checkpoints.model, MOE_LAYERS[1])(hidden, index, weights)
    torch.testing.assert_close(shard.forward(1, hidden, index, weights), expected, rtol=0, atol=1e-5)


def test_forward_empty_and_unrouted(checkpoints: Checkpoints) -> None:
    shard = ExpertShard.load(
        CheckpointReader(checkpoints.fused), MOE_LAYERS, every_layer([0, 1, 2]), torch.float32
    )
    empty = shard.forward(
        0, torch.empty(0, 32), torch.empty(0, TOP_K, dtype=torch.int64), torch.empty(0, TOP_K)
    )
    assert empty.shape == (0, 32)
    rows = torch.randn(5, 32)
    none = shard.forward(0, rows, torch.full((5, TOP_K), -1), torch.rand(5, TOP_K))
    assert torch.equal(none, torch.zeros(5, 32))
    partial_ids = torch.tensor([[0, -1, -1], [-1, -1, -1], [2, 0, -1], [-1, -1, 1], [-1, -1, -1]])
    out = shard.forward(0, rows, partial_ids, torch.rand(5, TOP_K))
    assert torch.equal(out[[1, 4]], torch.zeros(2, 32)) and out[[0, 2, 3]].abs().sum(dim=1).gt(0).all()


def test_forward_rejects_unknown_local_expert(checkpoints: Checkpoints) -> None:
    shard = ExpertShard.load(
        CheckpointReader(checkpoints.fused), MOE_LAYERS, every_layer([0, 1, 2]), torch.float32
    )
    with pytest.raises(ValueError, match="local expert id 3 >= 3"):
        shard.forward(0, torch.randn(1, 32), torch.tensor([[3, 0, -1]]), torch.rand(1, TOP_K))


def test_forward_bfloat16(checkpoints: Checkpoints) -> None:
    reader = CheckpointReader(checkpoints.per_expert)
    ids = [1, 3, 8]
    exact = ExpertShard.load(reader, MOE_LAYERS, every_layer(ids), torch.float32)
    half = ExpertShard.load(reader, MOE_LAYERS, every_layer(ids), torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(16, 32, generator=gen)
    local_ids = torch.randint(-1, 3, (16, TOP_K), generator=gen)
    weights = torch.rand(16, TOP_K, generator=gen)
    got = half.forward(1, rows.to(torch.bfloat16), local_ids, weights)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact.forward(1, rows, local_ids, weights), rtol=0.05, atol=0.1)


def test_loads_only_owned_experts(checkpoints: Checkpoints, tmp_path: Path) -> None:
    owned = [3, 4, 5]
    tensors = load_file(checkpoints.per_expert / "model.safetensors")
    unowned = re.compile(rf"\.mlp\.experts\.(?!({'|'.join(map(str, owned))})\.)")
    save_file({n: t for n, t in tensors.items() if not unowned.search(n)}, tmp_path / "model.safetensors")
    shard = ExpertShard.load(CheckpointReader(tmp_path), MOE_LAYERS, every_layer(owned), torch.float32)
    assert torch.equal(shard.down[0], _experts(checkpoints.model, MOE_LAYERS[0]).down_proj.detach()[owned])


def test_missing_expert_tensor_named(checkpoints: Checkpoints, tmp_path: Path) -> None:
    tensors = load_file(checkpoints.per_expert / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.6.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"tensor model\.layers\.2\.mlp\.experts\.6\.up_proj\.weight not found"
    ):
        ExpertShard.load(CheckpointReader(tmp_path), MOE_LAYERS, every_layer([5, 6]), torch.float32)


def test_per_expert_shape_mismatch_named(checkpoints: Checkpoints, tmp_path: Path) -> None:
    tensors = load_file(checkpoints.per_expert / "model.safetensors")
    tensors["model.layers.2.mlp.experts.1.down_proj.weight"] = torch.zeros(32, 15)
    save_file(tensors, tmp_path / "model.safetensors")
    name = re.escape("model.layers.2.mlp.experts.1.down_proj.weight")
    message = rf"tensor {name} .*expected shape \(32, 16\), found \(32, 15\)"
    with pytest.raises(CheckpointError, match=message):
        ExpertShard.load(CheckpointReader(tmp_path), MOE_LAYERS, every_layer([0, 1]), torch.float32)


def test_fused_shape_mismatch_named(checkpoints: Checkpoints, tmp_path: Path) -> None:
    tensors = load_file(checkpoints.fused / "model.safetensors")
    tensors["model.layers.2.mlp.experts.down_proj"] = torch.zeros(NUM_EXPERTS, 16, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    name = re.escape("model.layers.2.mlp.experts.down_proj")
    message = rf"tensor {name} .*expected shape \(10, 32, 16\), found \(10, 16, 32\)"
    with pytest.raises(CheckpointError, match=message):
        ExpertShard.load(CheckpointReader(tmp_path), MOE_LAYERS, every_layer([0, 1]), torch.float32)


def test_fused_expert_out_of_range(checkpoints: Checkpoints) -> None:
    with pytest.raises(CheckpointError, match="holds 10 experts, expert 10 requested"):
        ExpertShard.load(CheckpointReader(checkpoints.fused), MOE_LAYERS, every_layer([9, 10]), torch.float32)


def test_constructor_validates_shapes() -> None:
    with pytest.raises(ValueError, match="one gate_up and one down per MoE layer"):
        ExpertShard([torch.zeros(2, 8, 4)], [])
    with pytest.raises(ValueError, match="MoE layer 1"):
        ExpertShard([torch.zeros(2, 8, 4)] * 2, [torch.zeros(2, 4, 4), torch.zeros(2, 4, 3)])


def _kernel_case(dtype: torch.dtype, rows: int, seed: int = 0) -> tuple[list, list, torch.Tensor, ...]:
    """Six experts, uneven rows per expert, expert 5 with none, some empty slots and a row with none."""
    gen = torch.Generator().manual_seed(seed)
    experts, hidden, inter, k = 6, 32, 16, 3
    gate_up = [(torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype)]
    down = [(torch.randn(experts, hidden, inter, generator=gen) * 0.2).to(dtype)]
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    ids = torch.randint(0, experts - 1, (rows, k), generator=gen)  # expert 5 never gets a row
    ids[::4, 1] = -1  # empty slots
    ids[-1] = -1  # a row this shard computes nothing for
    return gate_up, down, x, ids, torch.rand(rows, k, generator=gen)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_gemm_matches_the_per_expert_loop(dtype, tol):
    """torch._grouped_mm against the per-expert loop, on the CPU: same rows, same experts."""
    gate_up, down, x, ids, weights = _kernel_case(dtype, 40)
    grouped = ExpertShard(gate_up, down, "grouped_mm").forward(0, x, ids, weights)
    looped = ExpertShard(gate_up, down, "loop").forward(0, x, ids, weights)
    assert (grouped.float() - looped.float()).abs().max().item() < tol


@pytest.mark.parametrize("rows", [1, 2, 7, 40, 300])
def test_gemv_kernel_matches_the_per_expert_loop(rows: int) -> None:
    """The C decode kernel (fp32, [in, out] memory) against the loop, from one row to many per expert;
    the last row has no expert here and gets zeros."""
    gate_up, down, x, ids, weights = _kernel_case(torch.float32, rows, seed=rows)
    gemv = ExpertShard(gate_up, down, "gemv")
    assert gemv.gate_up[0].transpose(1, 2).is_contiguous(), "precondition: [in, out] memory"
    got = gemv.forward(0, x, ids, weights)
    torch.testing.assert_close(got, ExpertShard(gate_up, down, "loop").forward(0, x, ids, weights))
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))


def test_gemv_kernel_is_only_for_plain_fp32_experts_over_in_out_memory() -> None:
    gate_up, down, x, _, _ = _kernel_case(torch.float32, 8)
    with pytest.raises(ValueError, match="gemv kernel is not available"):
        ExpertShard([gate_up[0].bfloat16()], [down[0].bfloat16()], "gemv")
    with pytest.raises(ValueError, match="kernel must be one of"):
        ExpertShard(gate_up, down, "fast")
    assert ExpertShard([gate_up[0].bfloat16()], [down[0].bfloat16()]).gemv is None
    shard = ExpertShard(gate_up, down, "gemv")
    with pytest.raises(ValueError, match=r"\[in, out\] memory"):
        shard.gemv.swiglu_experts(
            x, gate_up[0].contiguous(), down[0].contiguous(), torch.ones(6, dtype=torch.int64)
        )


def test_auto_kernel_on_the_cpu_by_active_experts_and_rows_per_expert() -> None:
    """Few rows per active expert: the C kernel; else grouped_mm, which visits every local expert on
    the CPU, where many are active, and the loop where few are; a forced kernel always."""
    experts = 64
    auto = ExpertShard([torch.zeros(experts, 8, 4)], [torch.zeros(experts, 4, 4)])
    few, many = torch.zeros(experts, dtype=torch.int64), torch.ones(experts, dtype=torch.int64)
    few[[3, 17, 40, 63]] = 1
    assert (auto.kernel_for(few), auto.kernel_for(many)) == ("gemv", "gemv")
    assert auto.kernel_for(few * 16) == "loop"
    assert auto.kernel_for(many * 16) == "grouped_mm"
    auto.gemv = None  # as where no C compiler is found
    assert (auto.kernel_for(few), auto.kernel_for(many)) == ("loop", "grouped_mm")
    forced = ExpertShard([torch.zeros(experts, 8, 4)], [torch.zeros(experts, 4, 4)], "grouped_mm")
    assert forced.kernel_for(few) == "grouped_mm"
    assert ExpertShard(forced.gate_up, forced.down, "loop").kernel_for(many) == "loop"


def test_gemv_kernel_builds_once_per_host_and_falls_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    """Built into the cache on first use and loaded from it after, without the compiler; a compiler
    that fails leaves no kernel (torch's GEMMs run) and says why."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    gemv_kernel.load_gemv.cache_clear()
    try:
        assert gemv_kernel.load_gemv() is not None
        assert len(list((tmp_path / "home" / ".cache" / "moe-cluster").glob("gemv-*.so"))) == 1
        gemv_kernel.load_gemv.cache_clear()
        with monkeypatch.context() as no_compiler:
            no_compiler.setattr(gemv_kernel.subprocess, "run", None)  # any build would fail
            assert gemv_kernel.load_gemv() is not None
        gemv_kernel.load_gemv.cache_clear()
        monkeypatch.setenv("CC", "false")  # another compiler, another build: it fails
        with caplog.at_level(logging.WARNING, logger="experts.gemv_kernel"):
            assert gemv_kernel.load_gemv() is None
        assert "could not be built" in caplog.text
        assert ExpertShard([torch.zeros(4, 8, 4)], [torch.zeros(4, 4, 4)]).gemv is None
        monkeypatch.delenv("CC")
        (tmp_path / "home" / ".cache" / "moe-cluster").chmod(0o777)  # anyone could plant a library
        gemv_kernel.load_gemv.cache_clear()
        assert gemv_kernel.load_gemv() is not None
        assert list((tmp_path / "tmp" / f"moe-cluster-{os.getuid()}").glob("gemv-*.so")), "built elsewhere"
    finally:
        gemv_kernel.load_gemv.cache_clear()


def test_reslot_copies_held_experts_reads_the_others_and_leaves_the_live_shard_alone(checkpoints) -> None:
    reader = CheckpointReader(checkpoints.fused)
    live = ExpertShard.load(reader, MOE_LAYERS, every_layer([2, 5, 7]), torch.float32)
    before = [t.clone() for t in live.gate_up]
    new, read = live.reslot(reader, MOE_LAYERS, every_layer([2, 5, 7]), every_layer([7, 0, 2, 9]))
    fresh = ExpertShard.load(reader, MOE_LAYERS, every_layer([7, 0, 2, 9]), torch.float32)
    for layer in range(2):
        assert torch.equal(new.gate_up[layer], fresh.gate_up[layer])
        assert torch.equal(new.down[layer], fresh.down[layer])
        assert torch.equal(live.gate_up[layer], before[layer])
        assert new.gate_up[layer].data_ptr() != live.gate_up[layer].data_ptr()
    assert read == 2 * 2 * (2 * 16 * 32 + 32 * 16) * 4  # experts 0 and 9, two layers, fp32
    assert live.reslot(reader, MOE_LAYERS, every_layer([2, 5, 7]), every_layer([5, 2]))[1] == 0
    assert new.forced is None  # a reslotted shard still picks its kernel per call


def test_each_layer_holds_and_reslots_its_own_experts(checkpoints) -> None:
    """Per-layer slots (a placement balanced layer by layer): each layer's slots hold that layer's
    experts, and a reslot reads from the checkpoint only what each layer did not hold."""
    reader = CheckpointReader(checkpoints.fused)
    held = [[2, 5, 7], [0, 1, 9]]
    live = ExpertShard.load(reader, MOE_LAYERS, held, torch.float32)
    for layer, ids in enumerate(held):
        alone = ExpertShard.load(reader, [MOE_LAYERS[layer]], [ids], torch.float32)
        assert torch.equal(live.gate_up[layer], alone.gate_up[0])
        assert torch.equal(live.down[layer], alone.down[0])
    wanted = [[7, 2, 3], [1, 0, 9]]  # layer 0 reads expert 3; layer 1 only reorders
    new, read = live.reslot(reader, MOE_LAYERS, held, wanted)
    fresh = ExpertShard.load(reader, MOE_LAYERS, wanted, torch.float32)
    for layer in range(2):
        assert torch.equal(new.gate_up[layer], fresh.gate_up[layer])
        assert torch.equal(new.down[layer], fresh.down[layer])
    assert read == (2 * 16 * 32 + 32 * 16) * 4  # one expert of one layer, fp32
    with pytest.raises(ValueError, match="as many slots"):
        ExpertShard.load(reader, MOE_LAYERS, [[2, 5], [0]], torch.float32)


def _transposed_memory(t: torch.Tensor) -> bool:
    """[E, out, in] values whose memory is [E, in, out], dense."""
    return t.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    "dtype, transposed", [(torch.float32, True), (torch.bfloat16, False)], ids=["fp32", "bf16"]
)
def test_weights_are_held_in_the_memory_order_the_cpu_gemm_reads_fastest(checkpoints, dtype, transposed):
    """fp32 on the CPU: [E, in, out] memory behind the [E, out, in] values, from a load, a reslot and a
    shard built from checkpoint-order tensors alike, with the same forward as the checkpoint's order."""
    reader = CheckpointReader(checkpoints.fused)
    loaded = ExpertShard.load(reader, MOE_LAYERS, every_layer([2, 5, 7]), dtype)
    moved, _ = loaded.reslot(reader, MOE_LAYERS, every_layer([2, 5, 7]), every_layer([7, 0, 2]))
    given = [t.contiguous() for t in loaded.gate_up], [t.contiguous() for t in loaded.down]
    built = ExpertShard(*given)
    for shard in (loaded, moved, built):
        for t in (*shard.gate_up, *shard.down):
            assert _transposed_memory(t) is transposed and t.is_contiguous() is not transposed
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, built.hidden_size, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(3, generator=gen) for _ in range(5)])
    weights = torch.rand(5, 3, generator=gen)
    checkpoint_order = ExpertShard(*given, "loop")  # torch's GEMMs, which read either memory order
    checkpoint_order.gate_up, checkpoint_order.down = given
    torch.testing.assert_close(
        built.forward(0, rows, ids, weights), checkpoint_order.forward(0, rows, ids, weights)
    )
