"""Batch benchmark: `moe-cluster batch` on Ray Data with 1 and 2 model instances, against the old loop and
the serving path.

All measured phases run on one local Ray cluster that the benchmark starts, with the same model, prompts
(those of benchmarks/serving.py, cycled), greedy decoding and max_tokens:

  ray data R=1, R=2:  cluster.batch.run_batch over a JSONL file of N records into a fresh output directory
                      (the pool's actors start their model instances inside the run: the wall time
                      includes start-up)
  serving:            the OpenAI HTTP API on Ray Serve (one engine replica), C concurrent streaming
                      clients sending the same N prompts (benchmarks/serving.py's client)
  old loop R=1, R=2:  not run: the streaming loop of our own that `moe-cluster batch` was before Ray Data
                      is gone; its rows come from a committed run of this benchmark at commit 3e77a1a
                      on the same input (--old-loop-json, 256 records x 32 tokens, 1 expert shard),
                      start-up and generating time apart

    python -m benchmarks.batch [--records 256] [--max-tokens 32] [--clients 64] [--expert-shards 1]
                               [--model-path DIR] [--old-loop-json PATH] [--json PATH]
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

from benchmarks.results import RESULTS_DIR, BenchmarkRun
from benchmarks.serving import PROMPTS, discover_model, free_port, run_phase  # the serving benchmark's client

MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 64
OLD_LOOP_RUN = RESULTS_DIR / "batch-old-loop-20261201T233159Z.json"  # the old loop at 3e77a1a, 256 x 32


@dataclass
class Row:
    path: str
    replicas: int
    records: int
    failed: int
    output_tokens: int
    wall_s: float  # start-up included
    rows_per_s: float  # over wall_s
    tokens_per_s: float  # over wall_s
    startup_s: float | None = None  # known apart for the old loop and the serving path only
    tokens_per_s_after_startup: float | None = None


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
        output=records.with_name(f"out-{replicas}"),
        model=model,
        replicas=replicas,
        max_tokens=args.max_tokens,
        overwrite=True,
        engine_options={
            "expert_shards": args.expert_shards,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_model_len": MAX_MODEL_LEN,
        },
    )
    summary = run_batch(options)
    return Row(
        path="ray data",
        replicas=replicas,
        records=summary.ok + summary.failed,
        failed=summary.failed,
        output_tokens=summary.tokens,
        wall_s=summary.wall_s,
        rows_per_s=summary.rows_per_s(),
        tokens_per_s=summary.tokens_per_s(),
    )


def old_loop_rows(path: Path) -> list[Row]:
    """The old loop's rows of a committed run of this benchmark (its `batch` rows)."""
    rows = []
    for r in json.loads(path.read_text())["results"]["rows"]:
        if r["path"] != "batch":
            continue
        wall = r["startup_s"] + r["generating_s"]
        rows.append(
            Row(
                path=f"old loop ({path.name})",
                replicas=r["replicas"],
                records=r["records"],
                failed=r["failed"],
                output_tokens=r["output_tokens"],
                wall_s=wall,
                rows_per_s=r["records"] / wall,
                tokens_per_s=r["output_tokens"] / wall,
                startup_s=r["startup_s"],
                tokens_per_s_after_startup=r["tokens_per_s"],
            )
        )
    return rows


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
    wall = startup + phase.seconds
    return Row(
        path="serving (HTTP)",
        replicas=1,
        records=phase.requests,
        failed=phase.failed,
        output_tokens=phase.output_tokens,
        wall_s=wall,
        rows_per_s=phase.requests / wall,
        tokens_per_s=phase.output_tokens / wall,
        startup_s=startup,
        tokens_per_s_after_startup=phase.output_tokens_per_s,
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[Row]) -> str:
    header = ["path", "replicas", "records", "failed", "out tokens", "wall s", "rows/s", "tokens/s"]
    header += ["start-up s", "tokens/s after start-up"]
    cells = [header] + [
        [r.path, str(r.replicas), str(r.records), str(r.failed), str(r.output_tokens)]
        + [_cell(v) for v in (r.wall_s, r.rows_per_s, r.tokens_per_s, r.startup_s)]
        + [_cell(r.tokens_per_s_after_startup)]
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
    parser.add_argument("--old-loop-json", type=Path, default=OLD_LOOP_RUN, help="the old loop's run")
    parser.add_argument("--json", type=Path, help="write the results here instead of benchmarks/results/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.demo import demo_model_path

    args = parse_args(argv)
    run = BenchmarkRun("batch", args)
    model = Path(args.model_path) if args.model_path else demo_model_path()
    old = old_loop_rows(args.old_loop_json)
    old_args = json.loads(args.old_loop_json.read_text())["args"]
    same_input = all(old_args.get(k) == getattr(args, k) for k in ("records", "max_tokens", "expert_shards"))
    load_before = os.getloadavg()[0]
    os.environ.pop("RAY_ADDRESS", None)
    per_replica = 1 + args.expert_shards
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2 * per_replica + 2), include_dashboard=False, log_to_driver=False
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            records = Path(tmp) / "in.jsonl"
            write_records(records, args.records, args.max_tokens)
            rows = [run_batch_phase(args, model, records, r) for r in (1, 2)]
        rows.append(run_serving_phase(args, model))
    finally:
        ray.shutdown()
    rows += old
    print(
        f"{model.name}, {args.expert_shards} expert shard(s) per replica, {args.records} records, "
        f"max_tokens {args.max_tokens}, greedy; serving: {args.clients} streaming clients"
    )
    print(format_table(rows))
    for new in rows[:2]:
        base = next((r for r in old if r.replicas == new.replicas), None)
        if base is not None and same_input:
            rows_ratio, tokens_ratio = new.rows_per_s / base.rows_per_s, new.tokens_per_s / base.tokens_per_s
            print(
                f"ray data R={new.replicas} / old loop R={base.replicas}, over wall time: "
                f"rows/s {rows_ratio:.2f}x, tokens/s {tokens_ratio:.2f}x"
            )
    if not same_input:
        print(f"the old loop's run ({args.old_loop_json.name}) had another input: {old_args}; no ratios")
    print(
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs; "
        "wall time includes start-up; the old loop's rows are its committed run, not measured here"
    )
    results = {"model": model.name, "same_input_as_old_loop": same_input, "rows": [asdict(r) for r in rows]}
    run.write(results, args.json)
    return 0 if not any(r.failed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
