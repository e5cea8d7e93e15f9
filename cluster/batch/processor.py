"""Batch inference inside a user's own Ray Data pipeline.

`ds.map_batches(MoEPredictor, fn_constructor_kwargs={...}, concurrency=N, batch_size=B)`: every actor of
the pool drives one model instance (a router actor and its expert actors, like `Engine`), hands each batch
of rows to the router's continuous batching in one call, and returns the rows with completion columns.
A row is a record of `moe-cluster batch` (`prompt` or `messages`, optional `id` and sampling fields), or,
with `record_column`, holds one as JSON text (a line of a JSONL file, parsed per row so that a malformed
line is one bad row). A row that cannot be served gets its reason in `error` and empty completion columns,
so one bad row never fails the job. When the model instance's router dies, the actor starts a new instance
and serves the batch again (Ray Data retries the batch of an actor that dies itself).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cluster.batch.records import Request, parse_line, parse_record, result_record
from cluster.engine import Engine
from cluster.options.engine import EngineConfig
from router.sampling import SamplingParams

OUTPUT_COLUMNS = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def plain(value: Any) -> Any:
    """A Ray Data cell as plain Python (numpy arrays and scalars become lists and numbers)."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def missing(value: Any) -> bool:
    """A null cell: a field this row does not have (Arrow fills the columns other rows have; numpy turns a
    null float into NaN, so a NaN cell counts as absent too)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def output_columns(result: dict[str, Any]) -> dict[str, Any]:
    usage = result.get("usage") or {}
    return {
        "text": result.get("text"),
        "token_ids": result.get("token_ids"),
        "finish_reason": result.get("finish_reason"),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "error": result.get("error"),
    }


class MoEPredictor:
    def __init__(
        self,
        model: str | None = None,
        engine_options: dict[str, Any] | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        record_column: str | None = None,
    ) -> None:
        from cluster.demo import demo_model_path

        path = Path(model) if model else demo_model_path()
        self.config = EngineConfig(model_path=path, **(engine_options or {}))
        self.engine = Engine(self.config)
        self.defaults = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        self.record_column = record_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        parsed = self._parse(batch)
        requests = [p for p in parsed if isinstance(p, Request)]
        answers = iter(self._generate(requests) if requests else ())
        results = [result_record(p, next(answers)) if isinstance(p, Request) else p for p in parsed]
        passed = [name for name in batch if name not in OUTPUT_COLUMNS and name != self.record_column]
        out: dict[str, list] = {name: list(batch[name]) for name in passed}
        if self.record_column is not None:  # the record's own id, as text: one Arrow type for the column
            out["id"] = [None if r["id"] is None else str(r["id"]) for r in results]
        for name in OUTPUT_COLUMNS:
            out[name] = [output_columns(r)[name] for r in results]
        return out

    def _parse(self, batch: dict[str, np.ndarray]) -> list[Request | dict]:
        if self.record_column is not None:
            raw = batch[self.record_column]
            return [parse_line(i, bytes(line), self.defaults) for i, line in enumerate(raw)]
        columns = list(batch)
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        records = [{k: v for k, v in plain(row).items() if not missing(v)} for row in rows]
        return [parse_record(i, record, self.defaults) for i, record in enumerate(records)]

    def _generate(self, requests: list[Request]) -> list[dict]:
        prompts, params = [r.prompt for r in requests], [r.params for r in requests]
        try:
            return ray.get(self.engine.router.generate_each.remote(prompts, params))
        except ray.exceptions.RayActorError:  # the instance is lost: a new one serves the whole batch
            self.engine.shutdown()
            self.engine = Engine(self.config)
            return ray.get(self.engine.router.generate_each.remote(prompts, params))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
