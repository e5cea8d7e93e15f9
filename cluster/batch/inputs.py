"""The input of `moe-cluster batch` as a Ray Dataset of rows with stable ids.

The input is a JSONL or Parquet file, or a directory of them (searched recursively). Every row carries
`source` (its file, relative to the input directory, or the file's name), `row` (its line number in a JSONL
file, its row number from 1 in a Parquet file) and `row_id` ("source:row"), the same on every run, and
`record`: the request as JSON bytes, parsed per row by MoEPredictor so that a line that is not JSON is one
bad row. Rows already in the output are left out. Each file is read by one task on this node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ROWS_PER_READ = 1024  # Parquet rows decoded at a time


def row_id(source: str, row: int) -> str:
    return f"{source}:{row}"


def input_files(path: Path) -> dict[str, Path]:
    """source name -> file, in name order; a directory gives every JSONL and Parquet file under it."""
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise ValueError(f"input {path} is neither a file nor a directory")
    files = {
        str(p.relative_to(path)): p
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix in FORMATS and not p.name.startswith(".")
    }
    if not files:
        raise ValueError(f"input directory {path} holds no .jsonl, .json, .ndjson or .parquet file")
    return files


def file_rows(source: str, path: Path, skip: set[int]) -> Iterator[dict[str, Any]]:
    """The rows of one input file, but those numbered in `skip`."""
    numbered = enumerate(_parquet_records(path) if path.suffix == ".parquet" else _lines(path), 1)
    for row, record in numbered:
        if record.strip() and row not in skip:  # a blank line is no row
            yield {"row_id": row_id(source, row), "source": source, "row": row, "record": record}


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as lines:
        yield from lines


def _parquet_records(path: Path) -> Iterator[bytes]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_READ):
        for record in batch.to_pylist():
            present = {k: v for k, v in record.items() if v is not None}  # a null cell is an absent field
            yield json.dumps(present, default=str).encode()


def _read(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from file_rows(item["source"], Path(item["path"]), set(item["skip"]))


def pending_rows(files: dict[str, Path], done: dict[str, set[int]]) -> int:
    """How many rows of `files` are not in `done` (read here, on the driver)."""
    return sum(1 for s, path in files.items() for _ in file_rows(s, path, done.get(s, set())))


def read_input(files: dict[str, Path], done: dict[str, set[int]]) -> ray.data.Dataset:
    """The rows of `files` not yet in `done` (rows by source), read on this node.

    The reads ask for no CPU: this node may have none (a KubeRay head with num-cpus 0 runs the driver).
    """
    items = [
        {"source": s, "path": str(p.resolve()), "skip": sorted(done.get(s, ()))} for s, p in files.items()
    ]
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _read, num_cpus=0, ray_remote_args_fn=lambda: {"scheduling_strategy": here}
    )
