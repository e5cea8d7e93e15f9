"""The output of `moe-cluster batch`: a directory of part files, each written whole, and what they hold.

A write task writes each block to a hidden temporary file, fsyncs it and renames it to
`part-<digest>.<format>`, the digest naming the block's row ids: a part file is complete or absent, and a
retried write of the same rows replaces its own file. Opening the directory again (a re-run) removes
what a killed run left half-written (temporary files; a JSONL part cut short is cut back to its last
whole line, an unreadable Parquet part is removed), removes rows that a part repeats from an earlier
part, and tells which rows are done. One job at a time per directory (a lock that dies with its holder).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

OUTPUT_FORMATS = ("jsonl", "parquet")
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


@dataclass
class Contents:
    """What the complete part files hold."""

    rows: dict[str, set[int]] = field(default_factory=dict)  # source -> row numbers
    ok: int = 0
    failed: int = 0
    tokens: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed


def write_part(directory: Path, fmt: str, table: pa.Table) -> Path:
    digest = hashlib.sha256("\n".join(table.column("row_id").to_pylist()).encode()).hexdigest()[:24]
    final = directory / f"part-{digest}.{fmt}"
    temp = directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}-{final.name}"
    if fmt == "parquet":
        pq.write_table(table, temp)
    else:
        temp.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in table.to_pylist()))
    with temp.open("rb") as written:
        os.fsync(written.fileno())
    os.replace(temp, final)
    _sync_dir(directory)
    return final


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartSink(Datasink[int]):
    """Ray Data sink of the part files; a write task returns the rows it wrote."""

    def __init__(self, directory: Path, fmt: str) -> None:
        self.directory, self.fmt = directory, fmt

    def write(self, blocks: Iterable[Block], ctx: Any) -> int:
        rows = 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                write_part(self.directory, self.fmt, table)
                rows += table.num_rows
        return rows

    @property
    def supports_distributed_writes(self) -> bool:
        return False  # a local directory: the write tasks run on the driver's node


class OutputDir:
    """The locked output directory of one job."""

    def __init__(self, path: Path, fmt: str, overwrite: bool = False) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {path} exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        self.path, self.fmt = path, fmt
        self._lock = os.open(path / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise ValueError(f"another batch job is writing {path}") from None
        try:
            self._check_names()
            if overwrite:
                for part in self.parts():
                    part.unlink()
        except BaseException:
            self.close()
            raise

    def _check_names(self) -> None:
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(TEMP_PREFIX):
                entry.unlink()  # half-written by a killed run
            elif entry.name != LOCK_NAME and not (
                entry.name.startswith("part-") and entry.suffix == f".{self.fmt}"
            ):
                raise ValueError(
                    f"{entry} is not a {self.fmt} part file of `moe-cluster batch`; "
                    "use another output directory (or --overwrite to drop the part files)"
                )

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(f"part-*.{self.fmt}"))

    def sink(self) -> PartSink:
        return PartSink(self.path, self.fmt)

    def contents(self) -> Contents:
        """What the parts hold, once each part is whole and no row is in two parts."""
        found, seen = Contents(), set()
        for part in self.parts():
            table, whole = self._read(part)
            ids = table.column("row_id").to_pylist() if table.num_rows else []
            keep = [i not in seen for i in ids]
            if not (whole and all(keep)):  # torn, or rows a late write of a killed run repeated
                part.unlink()
                table = table.filter(pa.array(keep, pa.bool_())) if table.num_rows else table
                if table.num_rows:
                    write_part(self.path, self.fmt, table)
            if not table.num_rows:
                continue
            seen.update(ids)
            sources, rows = table.column("source").to_pylist(), table.column("row").to_pylist()
            for source, row in zip(sources, rows, strict=True):
                found.rows.setdefault(source, set()).add(row)
            answered = table.column("error").null_count
            found.ok += answered
            found.failed += table.num_rows - answered
            found.tokens += sum(n or 0 for n in table.column("completion_tokens").to_pylist())
        return found

    def _read(self, part: Path) -> tuple[pa.Table, bool]:
        """A part's whole rows, and whether it has nothing else (a torn or unreadable part has not)."""
        if self.fmt == "parquet":
            try:
                return pq.read_table(part), True
            except (OSError, pa.ArrowException):
                return pa.table({}), False
        data = part.read_bytes()
        rows = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
        whole = len(rows) == data.count(b"\n") and data.endswith(b"\n")
        return (pa.Table.from_pylist(rows) if rows else pa.table({})), whole

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lock)
