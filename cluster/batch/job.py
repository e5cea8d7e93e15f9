"""`moe-cluster batch`: a Ray Data pipeline from the input files through MoEPredictor to part files.

read (one task per input file, rows already in the output left out) -> map_batches(MoEPredictor) on a
pool of `replicas` actors, each driving one model instance -> write (PartSink: a part file per block,
written whole). Locally or as a Ray Jobs entrypoint; Ray Data draws its own progress. A re-run of the
same command after a kill finds the complete parts, repairs what the kill left and does the rest: every
input row is in the output exactly once, under its row id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from cluster.batch.inputs import input_files, pending_rows, read_input
from cluster.batch.output import OutputDir
from cluster.batch.processor import MoEPredictor
from cluster.batch.progress import Summary
from cluster.instance.resources import ensure_ray
from cluster.options.engine import EngineConfig
from router.sampling import SamplingParams


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
    output_format: str = "jsonl"
    batch_size: int = 0  # rows per call of a model instance; 0: twice its max_num_seqs (what it may hold)


def run_batch(options: BatchOptions) -> Summary:
    """Runs (or resumes) the job; returns its summary."""
    SamplingParams(max_tokens=options.max_tokens, temperature=options.temperature)  # the defaults are valid
    if options.replicas < 1 or options.batch_size < 0:
        raise ValueError("replicas must be at least 1 and batch_size at least 0")
    files = input_files(options.input)
    if options.output.resolve() in {p.resolve() for p in files.values()}:
        raise ValueError("the output must not be an input file")
    config = EngineConfig(model_path=options.model, **options.engine_options)
    room = config.max_num_seqs + config.max_waiting  # what a router takes in at once
    if options.batch_size > room:
        raise ValueError(f"batch_size {options.batch_size} exceeds max_num_seqs + max_waiting = {room}")
    out = OutputDir(options.output, options.output_format, options.overwrite)
    try:
        before = out.contents()
        summary = Summary(done_before=before.total)
        if pending_rows(files, before.rows):
            per_instance = config.router_cpus + config.expert_shards * config.expert_cpus
            started_ray = ensure_ray(options.replicas * per_instance + 1)
            try:
                # Part files are written on this (the driver's) node, which may have no CPUs: a KubeRay
                # head started with num-cpus 0 runs the job's driver. The writes ask for none.
                pipeline = _pipeline(options, config, files, before.rows)
                pipeline.write_datasink(out.sink(), ray_remote_args={"num_cpus": 0})
            finally:
                if started_ray:
                    ray.shutdown()
        after = out.contents()
    finally:
        out.close()
    summary.finish(
        ok=after.ok - before.ok,
        failed=after.failed - before.failed,
        tokens=after.tokens - before.tokens,
        ended=time.monotonic(),
    )
    return summary


def _pipeline(
    options: BatchOptions, config: EngineConfig, files: dict[str, Path], done: dict[str, set[int]]
) -> ray.data.Dataset:
    batch_size = options.batch_size or min(2 * config.max_num_seqs, config.max_num_seqs + config.max_waiting)
    # Blocks of one batch each: every actor of the pool gets work, and each batch is a part file.
    rows = read_input(files, done).repartition(target_num_rows_per_block=batch_size)
    return rows.map_batches(
        MoEPredictor,
        fn_constructor_kwargs={
            "model": str(options.model),
            "engine_options": options.engine_options,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "record_column": "record",
        },
        concurrency=options.replicas,
        batch_size=batch_size,
        # The pool actor waits on its router; the instance's actors hold the CPUs. Ray Data's actor pool
        # restarts a dead actor and retries its batches (max_restarts=-1, max_task_retries=-1).
        num_cpus=0,
    )
