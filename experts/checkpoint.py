"""Lazy, tensor-by-tensor access to a Hugging Face safetensors checkpoint directory."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the directory, file or tensor at fault."""


class CheckpointReader:
    """Tensor access to a Hugging Face model directory's safetensors files, opened lazily, never loading
    the whole checkpoint."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.model_dir} does not exist")
        self._handles: dict[Path, safe_open] = {}
        index = self.model_dir / INDEX_NAME
        self._files = self._from_index(index) if index.is_file() else self._from_files()

    def names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self._file_of(name)
        with _read_errors(name, path):
            tensor = self._handle(path).get_tensor(name)
        return tensor if dtype is None else tensor.to(dtype)

    def get_rows(
        self,
        name: str,
        rows: list[int],
        dtype: torch.dtype | None = None,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows `rows` of tensor `name` along dim 0, reading each run of consecutive rows as one slice.

        `out`, if given, receives the rows (cast to its dtype) instead of a newly allocated tensor, so
        a caller can fill a preallocated buffer without an intermediate copy.
        """
        view = self._slice(name)
        shape = tuple(view.get_shape())
        bad = [row for row in rows if not 0 <= row < shape[0]]
        if bad:
            raise CheckpointError(
                f"rows {bad} out of range for tensor {name} of shape {shape} in {self.model_dir}"
            )
        wanted = (len(rows), *shape[1:])
        if out is None:
            out = torch.empty(wanted, dtype=dtype or _DTYPES[view.get_dtype()])
        elif tuple(out.shape) != wanted:
            raise ValueError(f"out has shape {tuple(out.shape)}, rows of {name} need {wanted}")
        pos = 0
        for start, length in _runs(rows):
            out[pos : pos + length].copy_(view[start : start + length])
            pos += length
        return out

    def _from_index(self, index: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {exc}") from exc
        files = {name: self.model_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise CheckpointError(f"{index} names {path.name}, which is missing from {self.model_dir}")
        return files

    def _from_files(self) -> dict[str, Path]:
        single = self.model_dir / SINGLE_NAME
        paths = [single] if single.is_file() else sorted(self.model_dir.glob("*.safetensors"))
        if not paths:
            pickles = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"refusing pickle checkpoint {', '.join(pickles)} in {self.model_dir}: "
                    "only safetensors are loaded, pickle files are never unpickled"
                )
            raise CheckpointError(f"no safetensors weights in {self.model_dir}")
        files: dict[str, Path] = {}
        for path in paths:
            names = self._handle(path).keys()  # safe_open is not iterable
            for name in names:
                if name in files:
                    raise CheckpointError(f"tensor {name} is in both {files[name].name} and {path.name}")
                files[name] = path
        return files

    def _file_of(self, name: str) -> Path:
        try:
            return self._files[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} not found in checkpoint {self.model_dir}") from None

    def _handle(self, path: Path) -> safe_open:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
        return self._handles[path]

    def _slice(self, name: str) -> Any:
        path = self._file_of(name)
        with _read_errors(name, path):
            return self._handle(path).get_slice(name)


@contextmanager
def _read_errors(name: str, path: Path) -> Iterator[None]:
    try:
        yield
    except SafetensorError as exc:
        raise CheckpointError(f"tensor {name} not readable from {path}: {exc}") from exc


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of consecutive ascending row indices, in order."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs
