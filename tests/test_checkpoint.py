import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from experts.checkpoint import CheckpointError, CheckpointReader


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.fused": torch.randn(6, 4, 3, generator=gen),
        "a.weight": torch.randn(5, 2, generator=gen),
        "c.bias": torch.randn(7, generator=gen).to(torch.bfloat16),
    }


def _write_sharded(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shard files plus model.safetensors.index.json, as save_pretrained writes large models."""
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, model_dir / file)
    weight_map = {n: file for file, part in files.items() for n in part}
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def test_single_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(str(tmp_path))
    assert reader.model_dir == tmp_path
    assert reader.names() == ["a.weight", "b.fused", "c.bias"]
    assert reader.has("b.fused") and not reader.has("nope")
    assert reader.shape("b.fused") == (6, 4, 3)
    assert torch.equal(reader.get("a.weight"), tensors["a.weight"])
    bias = reader.get("c.bias", torch.float32)
    assert bias.dtype == torch.float32 and torch.equal(bias, tensors["c.bias"].float())


@pytest.mark.parametrize("rows", [[0], [1, 2, 3], [4, 0, 1, 5], [5, 4, 3], [2, 2], []])
def test_get_rows(tmp_path: Path, rows: list[int]) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    got = reader.get_rows("b.fused", rows)
    assert got.dtype == torch.float32 and torch.equal(got, tensors["b.fused"][rows])
    halved = reader.get_rows("b.fused", rows, torch.float16)
    assert halved.dtype == torch.float16 and torch.equal(halved, tensors["b.fused"][rows].half())
    out = torch.full((len(rows), 4, 3), float("nan"), dtype=torch.float64)
    assert reader.get_rows("b.fused", rows, out=out) is out
    assert torch.equal(out, tensors["b.fused"][rows].double())


def test_get_rows_errors(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=r"rows \[6\] out of range for tensor b.fused"):
        reader.get_rows("b.fused", [1, 6])
    with pytest.raises(ValueError, match="out has shape"):
        reader.get_rows("b.fused", [1, 2], out=torch.empty(3, 4, 3))


def test_sharded_index(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path, tensors)
    reader = CheckpointReader(tmp_path)
    assert reader.names() == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(reader.get(name), tensor)
    assert torch.equal(reader.get_rows("b.fused", [3, 1]), tensors["b.fused"][[3, 1]])


def test_sharded_files_open_lazily(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 64)
    reader = CheckpointReader(tmp_path)
    assert reader.get("a.weight").shape == (5, 2)
    with pytest.raises(
        CheckpointError, match=re.escape("model-00002-of-00002.safetensors is not a valid safetensors")
    ):
        reader.get("b.fused")


def test_all_safetensors_files_without_index(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file({"a.weight": tensors["a.weight"]}, tmp_path / "first.safetensors")
    save_file({"b.fused": tensors["b.fused"]}, tmp_path / "second.safetensors")
    reader = CheckpointReader(tmp_path)
    assert reader.names() == ["a.weight", "b.fused"]
    assert torch.equal(reader.get("b.fused"), tensors["b.fused"])


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1)}, tmp_path / "first.safetensors")
    save_file({"a": torch.ones(1)}, tmp_path / "second.safetensors")
    with pytest.raises(
        CheckpointError, match=re.escape("tensor a is in both first.safetensors and second.safetensors")
    ):
        CheckpointReader(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match=f"{re.escape(str(missing))} does not exist"):
        CheckpointReader(missing)


def test_pickle_checkpoint_refused(tmp_path: Path) -> None:
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match=re.escape("refusing pickle checkpoint pytorch_model.bin")
    ) as info:
        CheckpointReader(tmp_path)
    assert "safetensors" in str(info.value) and "never unpickled" in str(info.value)


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"no safetensors weights in {re.escape(str(tmp_path))}"):
        CheckpointReader(tmp_path)


def test_missing_tensor_named(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    for read in (reader.get, reader.shape, lambda n: reader.get_rows(n, [0])):
        with pytest.raises(
            CheckpointError, match=f"tensor model.gone not found in checkpoint {re.escape(str(tmp_path))}"
        ):
            read("model.gone")


def test_index_names_missing_file(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=re.escape("names model-00002-of-00002.safetensors, which is missing")
    ):
        CheckpointReader(tmp_path)


def test_index_names_tensor_absent_from_its_file(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    reader = CheckpointReader(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor ghost not readable from .*model-00001-of-00002"):
        reader.get("ghost")


def test_corrupt_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(
        CheckpointError, match=re.escape("model.safetensors.index.json is not a safetensors index")
    ):
        CheckpointReader(tmp_path)


def test_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(CheckpointError, match=re.escape("model.safetensors is not a valid safetensors file")):
        CheckpointReader(tmp_path)
