"""Batch benchmark: `moe-cluster batch` throughput with 1 and 2 engine replicas, against the serving path.

All phases run on one local Ray cluster that the benchmark starts, with the same model, prompts (those of
benchmarks/serving.py, cycled), greedy decoding and max_tokens:

  batch R=1, batch R=2:  cluster.batch.run_batch over a JSONL file of N records (engines started per run;
                         tokens/s counts from the moment they are up, start-up is reported apart)
  serving:               the OpenAI HTTP API on Ray Serve (one engine replica), C concurrent streaming
                         clients sending the same N prompts (benchmarks/serving.py's client)

    python -m benchmarks.batch [--records 256] [--max-tokens 32] [--clients 64] [--expert-shards 1]
                               [--model-path DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.results import BenchmarkRun
from benchmarks.serving import PROMPTS, discover_model, free_port, run_phase  # the serving benchmark's client

MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 64


@dataclass
class Row:
    path: str
    replicas: int
    records: int
    failed: int
    output_tokens: int
    startup_s: float
    generating_s: float
    tokens_per_s: float


def write_records(path: Path, count: int, max_tokens: int) -> None:
    with path.open("w") as out:
        for n in range(count):
            out.write(
                json.dumps({"id": n, "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": max_tokens}) + "\n"
            )


def run_batch_phase(args: argparse.Namespace, model: Path, records: Path, replicas: int) -> Row:
    from cluster.batch.job import BatchOptions, run_batch

    options = BatchOptions(
        input=records,
        output=records.with_name(f"out-{replicas}.jsonl"),
        model=model,
        replicas=replicas,
        max_tokens=args.max_tokens,
        overwrite=True,
        engine_options={
            "expert_shards": args.expert_shards,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_model_len": MAX_MODEL_LEN,
        },
        progress_interval_s=30,
    )
    progress = run_batch(options)
    return Row(
        path="batch",
        replicas=replicas,
        records=progress.ok + progress.failed,
        failed=progress.failed,
        output_tokens=progress.tokens,
        startup_s=progress.generating_since - progress.started,
        generating_s=progress.now() - progress.generating_since,
        tokens_per_s=progress.tokens_per_s(),
    )


def run_serving_phase(args: argparse.Namespace, model: Path) -> Row:
    from ray import serve

    from cluster.serve.app import build_app

    options = {
        "model": str(model),
        "expert_shards": args.expert_shards,
        "max_num_seqs": MAX_NUM_SEQS,
        "max_model_len": MAX_MODEL_LEN,
    }
    port = free_port()
    started = time.perf_counter()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(options), name="bench-batch", route_prefix="/")
        startup = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}"
        model_name = asyncio.run(discover_model(url, "none"))
        asyncio.run(run_phase("warm-up", url, model_name, "none", 2, 1, 8))
        per_client = max(1, args.records // args.clients)
        phase = asyncio.run(
            run_phase("serving", url, model_name, "none", args.clients, per_client, args.max_tokens)
        )
    finally:
        serve.shutdown()
    return Row(
        path="serving (HTTP)",
        replicas=1,
        records=phase.requests,
        failed=phase.failed,
        output_tokens=phase.output_tokens,
        startup_s=startup,
        generating_s=phase.seconds,
        tokens_per_s=phase.output_tokens_per_s,
    )


def format_table(rows: list[Row]) -> str:
    header = ["path", "replicas", "records", "failed", "out tokens", "start-up s", "generating s", "tokens/s"]
    cells = [header] + [
        [
            r.path,
            str(r.replicas),
            str(r.records),
            str(r.failed),
            str(r.output_tokens),
            f"{r.startup_s:.1f}",
            f"{r.generating_s:.1f}",
            f"{r.tokens_per_s:.1f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--clients", type=int, default=MAX_NUM_SEQS, help="concurrent clients of the serving path"
    )
    parser.add_argument("--expert-shards", type=int, default=1)
    parser.add_argument("--model-path", help="model directory (default: the demo model)")
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.demo import demo_model_path

    args = parse_args(argv)
    run = BenchmarkRun("batch", args)
    model = Path(args.model_path) if args.model_path else demo_model_path()
    load_before = os.getloadavg()[0]
    os.environ.pop("RAY_ADDRESS", None)
    per_replica = 1 + args.expert_shards
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2 * per_replica + 1), include_dashboard=False, log_to_driver=False
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            records = Path(tmp) / "in.jsonl"
            write_records(records, args.records, args.max_tokens)
            rows = [run_batch_phase(args, model, records, r) for r in (1, 2)]
        rows.append(run_serving_phase(args, model))
    finally:
        ray.shutdown()
    print(
        f"{model.name}, {args.expert_shards} expert shard(s) per replica, {args.records} records, "
        f"max_tokens {args.max_tokens}, greedy; serving: {args.clients} streaming clients"
    )
    print(format_table(rows))
    print(
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs; "
        "tokens/s counts from the moment the engines are up"
    )
    run.write({"model": model.name, "rows": [asdict(r) for r in rows]}, args.json)
    return 0 if not any(r.failed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
