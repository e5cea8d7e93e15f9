"""Batch inference over a JSONL file (`moe-cluster batch`), locally or as a Ray Jobs entrypoint.

The driver streams: it reads the input lazily, line by line, and sends its records in chunks (one Ray
call each) to the least loaded of R model instances (an `Engine`: a RouterActor and its ExpertActors),
keeping at most a window of records in flight per instance; each router batches everything it holds
continuously. A result is one JSON line written with one write() to the output opened for appending,
fsynced after every returned call. Each output line carries its input line number, so running the same
command again after a crash or a kill drops a torn last line, skips the lines already answered and
appends the rest: every record is in the output exactly once. Lines are in completion order.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from cluster.batch.progress import Progress
from cluster.engine import Engine
from cluster.instance.resources import ensure_ray
from cluster.options.engine import EngineConfig
from router.sampling import SamplingParams

Record = dict[str, Any]
Prompt = str | list[int] | list[dict]

# Per-record sampling fields and whether each must be an integer (else any finite number).
PARAM_FIELDS = {"max_tokens": True, "temperature": False, "top_p": False, "seed": True}
WAIT_S = 1.0  # longest wait for a call to return before the progress display gets a chance to update


class RecordError(ValueError):
    """A record that cannot be processed as given; the message goes to its output line."""


@dataclass(frozen=True)
class BatchOptions:
    input: Path
    output: Path
    model: Path
    replicas: int = 1
    max_tokens: int = 32
    temperature: float = 0.0
    overwrite: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineOptions fields
    chunk_size: int = 16  # records per Ray call
    progress_interval_s: float = 5.0  # between log lines when stderr is not a terminal


@dataclass(frozen=True)
class Request:
    line: int
    id: str | int | None
    prompt: Prompt
    params: SamplingParams


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of every non-blank line, read lazily."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                yield number, raw


def parse_line(line: int, raw: bytes, defaults: SamplingParams) -> Request | Record:
    """The request on an input line, or the error line to write for it."""
    try:
        record = json.loads(raw)
    except ValueError as err:
        return {"id": None, "line": line, "error": f"not JSON: {err}"}
    return parse_record(line, record, defaults)


def parse_record(line: int, record: Any, defaults: SamplingParams) -> Request | Record:
    """The request in a record (a JSON line, or a row of a Ray Dataset), or the error line for it."""
    if not isinstance(record, dict):
        return {
            "id": None,
            "line": line,
            "error": f"a record must be a JSON object, got {type(record).__name__}",
        }
    record_id = record.get("id")
    try:
        if not (record_id is None or isinstance(record_id, str | int)) or isinstance(record_id, bool):
            raise RecordError(f"'id' must be a string or an integer, got {record_id!r}")
        return Request(line, record_id, _prompt(record), _params(record, defaults))
    except ValueError as err:  # RecordError, or SamplingParams' range checks
        return {"id": record_id, "line": line, "error": str(err)}


def _prompt(record: Record) -> Prompt:
    if ("prompt" in record) == ("messages" in record):
        raise RecordError("a record needs exactly one of 'prompt' and 'messages'")
    if "prompt" in record:
        prompt = record["prompt"]
        if (isinstance(prompt, str) and prompt) or _is_token_ids(prompt):
            return prompt
        raise RecordError("'prompt' must be a non-empty string or a non-empty list of token ids")
    messages = record["messages"]
    if isinstance(messages, list) and messages and all(map(_is_message, messages)):
        return messages
    raise RecordError('\'messages\' must be a non-empty list of {"role": string, "content": string}')


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _params(record: Record, defaults: SamplingParams) -> SamplingParams:
    values = {}
    for name, integer in PARAM_FIELDS.items():
        value = record.get(name)
        if value is None:
            continue
        kinds = int if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise RecordError(
                f"'{name}' must be {'an integer' if integer else 'a finite number'}, got {value!r}"
            )
        values[name] = value
    return dataclasses.replace(defaults, **values)


def result_record(request: Request, result: Record) -> Record:
    """The output line for a request from RouterActor.generate_each's result for it."""
    head = {"id": request.id, "line": request.line}
    if "error" in result:
        return {**head, "error": result["error"]}
    prompt, completion = result["prompt_tokens"], len(result["token_ids"])
    return {
        **head,
        "text": result["text"],
        "token_ids": result["token_ids"],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "finish_reason": result["finish_reason"],
    }


class ResultFile:
    """The output JSONL: whole lines appended with one write() each; opening it again resumes.

    `done` holds the input line numbers already answered. A last line without its newline (a write torn
    by a crash) is cut off; any other line that is not a result of this command is an error. One writer
    at a time: a second job on the same output fails at once (the lock dies with its holder's process).
    """

    def __init__(self, path: Path, overwrite: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self.done = self._lock_and_read(path, overwrite)
        except BaseException:
            os.close(self._fd)
            raise

    def _lock_and_read(self, path: Path, overwrite: bool) -> set[int]:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another batch job is writing {path}") from None
        if overwrite:
            os.ftruncate(self._fd, 0)
            return set()
        return _answered_lines(path)

    def write(self, record: Record) -> None:
        data = (json.dumps(record) + "\n").encode()
        while data:  # a regular file takes it in one write(); the loop only guards against a short one
            data = data[os.write(self._fd, data) :]

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


def _answered_lines(path: Path) -> set[int]:
    done: set[int] = set()
    with path.open("r+b") as out:
        end = 0
        for number, raw in enumerate(out, 1):
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(_line_of(json.loads(raw)))
            except (ValueError, TypeError, KeyError):
                raise ValueError(
                    f"{path}:{number} is not a result line of `moe-cluster batch`; "
                    "use --overwrite to start afresh"
                ) from None
            end += len(raw)
        out.truncate(end)
    return done


def _line_of(record: Record) -> int:
    line = record["line"]
    if not isinstance(line, int) or isinstance(line, bool):
        raise TypeError(line)
    return line


class EnginePool:
    """Model instances fed least-loaded first, each with at most `window` records in flight."""

    def __init__(self, engines: list[Engine], window: int) -> None:
        self.engines, self.window = engines, window
        self.load = [0] * len(engines)
        self._calls: dict[ray.ObjectRef, tuple[int, list[Request]]] = {}

    def has_room(self) -> bool:
        return min(self.load) < self.window

    def busy(self) -> bool:
        return bool(self._calls)

    def submit(self, chunk: list[Request]) -> None:
        replica = self.load.index(min(self.load))
        router = self.engines[replica].router
        ref = router.generate_each.remote([r.prompt for r in chunk], [r.params for r in chunk])
        self._calls[ref] = (replica, chunk)
        self.load[replica] += len(chunk)

    def finished(self, timeout_s: float) -> list[tuple[list[Request], list[Record]]]:
        """The chunks whose call has returned, waiting up to timeout_s for one; a failed call raises."""
        if not self._calls:
            return []
        ready, _ = ray.wait(list(self._calls), num_returns=1, timeout=timeout_s)
        if ready:
            ready, _ = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)
        out = []
        for ref in ready:
            replica, chunk = self._calls.pop(ref)
            self.load[replica] -= len(chunk)
            out.append((chunk, ray.get(ref)))
        return out


def start_engines(config: EngineConfig, replicas: int) -> list[Engine]:
    """`replicas` model instances, brought up concurrently; all or none."""
    with ThreadPoolExecutor(replicas) as pool:
        futures = [pool.submit(Engine, config) for _ in range(replicas)]
    engines = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for engine in engines:
            engine.shutdown()
        raise failed[0]
    return engines


def run_batch(options: BatchOptions) -> Progress:
    """Runs (or resumes) the job; returns its progress, whose summary() is the closing line."""
    defaults = _check(options)
    config = EngineConfig(model_path=options.model, **options.engine_options)
    out = ResultFile(options.output, options.overwrite)
    try:
        total = done_before = 0
        for number, _ in input_lines(options.input):
            total += 1
            done_before += number in out.done
        progress = Progress(total, done_before, interval_s=options.progress_interval_s)
        if done_before < total:
            _run(options, config, defaults, out, progress)
        else:
            progress.close()
    finally:
        out.close()
    return progress


def _check(options: BatchOptions) -> SamplingParams:
    """The default sampling parameters, once the options are known to be usable."""
    if not options.input.is_file():
        raise ValueError(f"input {options.input} is not a file")
    if options.output.exists() and options.output.resolve() == options.input.resolve():
        raise ValueError("the output file must not be the input file")
    if options.replicas < 1 or options.chunk_size < 1:
        raise ValueError("replicas and chunk_size must be at least 1")
    return SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature)


def _run(
    options: BatchOptions, config: EngineConfig, defaults: SamplingParams, out: ResultFile, progress: Progress
) -> None:
    per_replica = config.router_cpus + config.expert_shards * config.expert_cpus
    started_ray = ensure_ray(options.replicas * per_replica)
    try:
        engines = start_engines(config, options.replicas)
        progress.begin()
        try:
            # Enough to keep every running slot busy, never more than the router lets wait.
            window = max(1, min(2 * config.max_num_seqs, config.max_waiting))
            todo = ((n, raw) for n, raw in input_lines(options.input) if n not in out.done)
            _drive(
                EnginePool(engines, window), todo, defaults, min(options.chunk_size, window), out, progress
            )
            progress.close()
        finally:
            for engine in engines:
                engine.shutdown()
    finally:
        if started_ray:
            ray.shutdown()


def _drive(
    pool: EnginePool,
    lines: Iterator[tuple[int, bytes]],
    defaults: SamplingParams,
    chunk_size: int,
    out: ResultFile,
    progress: Progress,
) -> None:
    chunk: list[Request] = []
    for number, raw in lines:
        item = parse_line(number, raw, defaults)
        if isinstance(item, Request):
            chunk.append(item)
        else:
            out.write(item)
            progress.update(failed=1)
        if len(chunk) == chunk_size:
            _submit(pool, chunk, out, progress)
            chunk = []
    if chunk:
        _submit(pool, chunk, out, progress)
    while pool.busy():
        _collect(pool, out, progress)


def _submit(pool: EnginePool, chunk: list[Request], out: ResultFile, progress: Progress) -> None:
    while not pool.has_room():
        _collect(pool, out, progress)
    pool.submit(chunk)


def _collect(pool: EnginePool, out: ResultFile, progress: Progress) -> None:
    finished = pool.finished(WAIT_S)
    for chunk, results in finished:
        records = [result_record(request, result) for request, result in zip(chunk, results, strict=True)]
        for record in records:
            out.write(record)
        failed = sum("error" in r for r in records)
        tokens = sum(r["usage"]["completion_tokens"] for r in records if "usage" in r)
        progress.update(ok=len(records) - failed, failed=failed, tokens=tokens)
    if finished:
        out.sync()
    progress.tick()
