"""`moe-cluster batch` on Ray Data: record validation, the output directory, and real runs on Ray.

The runs join the session's Ray cluster through RAY_ADDRESS (as `ray job submit` makes a driver do), except
the Ray Jobs test, which starts its own head (token auth on) and stops it by process group and temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.util.state import get_actor, list_actors

from cluster.batch.inputs import file_rows, input_files
from cluster.batch.output import OutputDir, write_part
from cluster.batch.progress import Summary
from cluster.batch.records import parse_line
from cluster.engine import Engine
from router.sampling import SamplingParams
from router.tokenizer import Tokenizer
from tests.conftest import free_port
from tests.ray_nodes import pids_naming
from tests.toolkit import wait_for

CLI = Path(sys.executable).with_name("moe-cluster")
RAY = Path(sys.executable).with_name("ray")
MAX_MODEL_LEN = 128
ENGINE = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5, "max_model_len": MAX_MODEL_LEN}
ENGINE_FLAGS = ["--expert-shards", "2", "--router-cpus", "0.5", "--expert-cpus", "0.5"]
ENGINE_FLAGS += ["--max-model-len", str(MAX_MODEL_LEN), "--progress-interval", "1"]
SLOW_FLAGS = ["--max-num-seqs", "8"]  # batches of 16 rows: many part files, a kill lands mid-way

# Malformed records, keyed by the input line they go on, with a part of the error each must get.
MALFORMED: dict[int, tuple[bytes, str]] = {
    5: (b"{oops", "not JSON"),
    17: (b"\xff\xfe not utf-8", "not JSON"),
    29: (b"[1, 2]", "must be a JSON object"),
    41: (b'{"id": "m1"}', "exactly one of 'prompt' and 'messages'"),
    53: (b'{"id": "m2", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "exactly one of"),
    66: (b'{"id": "m3", "prompt": 42}', "'prompt' must be"),
    80: (b'{"id": "m4", "prompt": "hi", "max_tokens": "8"}', "'max_tokens' must be an integer"),
    95: (b'{"id": "m5", "prompt": "hi", "temperature": true}', "'temperature' must be a finite number"),
    111: (b'{"id": "m6", "prompt": "hi", "top_p": 0}', "top_p must be in (0, 1]"),
    127: (json.dumps({"id": "m7", "prompt": list(range(5, 205))}).encode(), "max_model_len"),
    143: (b'{"id": "m8", "prompt": [1, 2, 9999]}', "outside the vocabulary"),
    160: (b'{"id": "m9", "messages": []}', "'messages' must be"),
    181: (b'{"id": {"a": 1}, "prompt": "hi"}', "'id' must be"),
}
BLANK_LINES = {12, 150}
TOTAL_LINES = 202  # 200 records and 2 blank lines
ROWS = set(range(1, TOTAL_LINES + 1)) - BLANK_LINES
PHRASES = ["The harbour town", "A computer program is", "When you cook rice", "She opened the door"]
COMPLETION = ("id", "text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "error")


def valid_record(n: int) -> dict:
    """Record n of the input: a chat, token ids or text, its own max_tokens; every tenth sampled, seeded."""
    record: dict = {"id": f"r{n}", "max_tokens": 4 + 2 * (n % 3)}
    if n % 4 == 0:
        record["messages"] = [{"role": "user", "content": f"Tell me about item {n}"}]
    elif n % 4 == 1:
        record["prompt"] = [5 + (7 * n + k) % 500 for k in range(3 + n % 5)]
    else:
        record["prompt"] = f"{PHRASES[n % len(PHRASES)]} {n}"
    if n % 10 == 0:
        record.update(temperature=0.8, top_p=0.9, seed=n)
    return record


@pytest.fixture(scope="module")
def batch_input(tmp_path_factory) -> Path:
    lines = []
    for line in range(1, TOTAL_LINES + 1):
        if line in BLANK_LINES:
            lines.append(b"  ")
        elif line in MALFORMED:
            lines.append(MALFORMED[line][0])
        else:
            lines.append(json.dumps(valid_record(line)).encode())
    path = tmp_path_factory.mktemp("batch") / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def cluster_env(ray_cluster) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


def cli_args(input_path: Path, out: Path, model: Path, *extra: str) -> list[str]:
    paths = ["--input", str(input_path), "--output", str(out), "--model", str(model)]
    return [str(CLI), "batch", *paths, *extra]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env, check=False)


def read_output(directory: Path) -> list[dict]:
    """Every row of the part files; none may be half-written and no temporary file may be left."""
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")], "a temporary file is left"
    rows = []
    for part in sorted(directory.glob("part-*")):
        if part.suffix == ".parquet":
            rows += pq.read_table(part).to_pylist()
        else:
            data = part.read_bytes()
            assert data.endswith(b"\n"), f"{part} ends in a partial line"
            rows += [json.loads(line) for line in data.splitlines()]
    return rows


def assert_exactly_once(results: list[dict], rows: set[int] = ROWS, source: str = "in.jsonl") -> dict:
    counts = Counter(r["row_id"] for r in results)
    assert {i for i, c in counts.items() if c > 1} == set()
    assert set(counts) == {f"{source}:{n}" for n in rows}
    assert all(r["row_id"] == f"{r['source']}:{r['row']}" for r in results)
    return {r["row"]: r for r in results}


@pytest.fixture(scope="module")
def fault_free(batch_input, demo_model, cluster_env, tmp_path_factory) -> tuple[dict[int, dict], str, str]:
    """One complete run with 2 model instances: results by input line, stdout, stderr."""
    out = tmp_path_factory.mktemp("fault-free") / "out"
    args = cli_args(batch_input, out, demo_model, "--replicas", "2", *ENGINE_FLAGS)
    run = run_cli(args, cluster_env)
    assert run.returncode == 0, run.stderr
    return assert_exactly_once(read_output(out)), run.stdout, run.stderr


def test_every_record_once_and_bad_ones_reported(fault_free):
    by_line, stdout, stderr = fault_free
    for line, (_, message) in MALFORMED.items():
        assert message in by_line[line]["error"], (line, by_line[line])
        assert by_line[line]["text"] is None and by_line[line]["token_ids"] is None
    assert by_line[5]["id"] is None and by_line[41]["id"] == "m1"
    for line, result in by_line.items():
        if line in MALFORMED:
            continue
        assert result["id"] == f"r{line}" and result["error"] is None, result
        assert result["completion_tokens"] == len(result["token_ids"]) <= valid_record(line)["max_tokens"]
        assert result["prompt_tokens"] > 0
        assert result["finish_reason"] in ("stop", "length") and isinstance(result["text"], str)
    assert f"{200 - len(MALFORMED)} ok, {len(MALFORMED)} failed" in stdout
    assert re.search(r"tokens generated; wall time [\d.]+ s; [\d.]+ rows/s, [\d.]+ tokens/s", stdout)
    assert re.search(r"MapBatches\(MoEPredictor\): \d+/\d+", stderr), stderr  # Ray Data's progress


def test_results_equal_engine_generate(fault_free, demo_model, ray_cluster):
    """Each record's completion is what Engine.generate gives for its prompt, greedy and seeded alike."""
    by_line, _, _ = fault_free
    tokenizer = Tokenizer.from_model_dir(demo_model)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for line in by_line.keys() - MALFORMED.keys():
        record = valid_record(line)
        params = (record["max_tokens"], record.get("temperature", 0.0), record.get("top_p", 1.0))
        groups[(*params, record.get("seed"))].append(line)
    assert any(seed is not None for *_, seed in groups)
    with Engine(demo_model, **ENGINE) as engine:
        for (max_tokens, temperature, top_p, seed), lines in groups.items():
            records = [valid_record(line) for line in lines]
            prompts = [
                tokenizer.apply_chat_template(r["messages"]) if "messages" in r else r["prompt"]
                for r in records
            ]
            expected = engine.generate(
                prompts, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed
            )
            for line, completion in zip(lines, expected, strict=True):
                assert by_line[line]["token_ids"] == completion.token_ids, line
                assert by_line[line]["text"] == completion.text, line
                assert by_line[line]["finish_reason"] == completion.finish_reason, line


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=out, start_new_session=True)


def parts_written(out: Path) -> int:
    return len(list(out.glob("part-*"))) if out.exists() else 0


def test_sigkill_of_the_driver_then_the_same_command_completes_exactly_once(
    fault_free, batch_input, demo_model, cluster_env, tmp_path
):
    out = tmp_path / "out"
    args = cli_args(batch_input, out, demo_model, *SLOW_FLAGS, *ENGINE_FLAGS)
    proc = start_cli(args, cluster_env, tmp_path / "killed.log")
    wait_for(lambda: proc.poll() is not None or parts_written(out) >= 2, 300)
    still_running = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert still_running, (tmp_path / "killed.log").read_text()
    time.sleep(2)  # the dead driver's workers go with it
    written = read_output(out)
    assert 0 < len(written) < 200
    # What a kill inside a write could leave: a temporary file, and a part cut short (of rows written).
    first = sorted(out.glob("part-*.jsonl"))[0].read_bytes().splitlines(keepends=True)
    (out / ".tmp-0123-part-x.jsonl").write_bytes(first[0][:9])
    (out / "part-torn.jsonl").write_bytes(first[0] + first[1][:11])

    rerun = run_cli(args, cluster_env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(written)} done by an earlier run)" in rerun.stdout  # the torn part repeated a row
    assert assert_exactly_once(read_output(out)) == fault_free[0]


def test_a_model_instance_killed_mid_way_is_replaced_and_its_rows_retried(
    fault_free, batch_input, demo_model, cluster_env, tmp_path
):
    out = tmp_path / "out"
    args = cli_args(batch_input, out, demo_model, "--replicas", "2", *SLOW_FLAGS, *ENGINE_FLAGS)
    proc = start_cli(args, cluster_env, tmp_path / "run.log")

    def predictors() -> list:
        alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
        return [a for a in alive if "MoEPredictor" in a.class_name]

    try:
        wait_for(lambda: proc.poll() is not None or parts_written(out) >= 1, 300)
        victims = predictors()
        assert proc.poll() is None and victims, (tmp_path / "run.log").read_text()
        os.kill(victims[0].pid, signal.SIGKILL)  # the pool actor: its router and experts die with it
        assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert get_actor(victims[0].actor_id).num_restarts >= 1
    assert assert_exactly_once(read_output(out)) == fault_free[0]


def test_a_directory_of_jsonl_and_parquet_files_to_parquet(fault_free, demo_model, cluster_env, tmp_path):
    """Many files, both formats, nested: each row answered once, as the same record is on the JSONL input."""
    texts = [n for n in sorted(fault_free[0]) if n not in MALFORMED and n % 4 in (2, 3)]
    jsonl, parquet = texts[:20], texts[20:50]
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    (source / "a.jsonl").write_text("".join(json.dumps(valid_record(n)) + "\n" for n in jsonl))
    records = [valid_record(n) for n in parquet]
    columns = sorted({k for r in records for k in r})  # from_pylist would take the first row's only
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
    pq.write_table(table, source / "sub" / "b.parquet")
    (source / "notes.txt").write_text("not an input file\n")
    out = tmp_path / "out"
    args = cli_args(source, out, demo_model, "--output-format", "parquet", *ENGINE_FLAGS)
    run = run_cli(args, cluster_env)
    assert run.returncode == 0, run.stderr
    results = read_output(out)
    assert {p.suffix for p in out.glob("part-*")} == {".parquet"}
    by_id = {r["row_id"]: r for r in results}
    assert len(by_id) == len(results) == len(jsonl) + len(parquet)
    expected = {f"a.jsonl:{i}": n for i, n in enumerate(jsonl, 1)}
    expected |= {f"sub/b.parquet:{i}": n for i, n in enumerate(parquet, 1)}
    assert set(by_id) == set(expected)
    for row_id, n in expected.items():
        got = by_id[row_id]
        assert (got["id"], got["token_ids"]) == (f"r{n}", fault_free[0][n]["token_ids"]), row_id


def test_1000_rows_with_5_percent_malformed(demo_model, cluster_env, tmp_path):
    kinds = list(MALFORMED.values())
    bad = {n: kinds[n % len(kinds)] for n in range(7, 1001, 20)}  # 50 of 1,000
    lines = [
        bad[n][0] if n in bad else json.dumps({"id": n, "prompt": f"{PHRASES[n % 4]} {n}"}).encode()
        for n in range(1, 1001)
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    args = cli_args(tmp_path / "in.jsonl", out, demo_model, "--replicas", "2", "--max-tokens", "2")
    run = run_cli([*args, *ENGINE_FLAGS], cluster_env)
    assert run.returncode == 0, run.stderr
    by_row = assert_exactly_once(read_output(out), set(range(1, 1001)))
    for n, result in by_row.items():
        if n in bad:
            assert bad[n][1] in result["error"] and result["token_ids"] is None, (n, result)
        else:
            assert result["error"] is None and result["id"] == str(n), result
            assert 1 <= len(result["token_ids"]) <= 2 and result["finish_reason"] in ("stop", "length")
    assert f"{950} ok, {50} failed" in run.stdout


@pytest.fixture
def ray_head():
    """A Ray head of its own (token auth on by default), stopped by its process group and temp dir only."""
    temp_dir = tempfile.mkdtemp(prefix="moeb", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    dashboard = free_port()
    ports = ["--port", str(free_port()), "--dashboard-port", str(dashboard)]
    ports += ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    head = ["--head", "--num-cpus", "6", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
    start = subprocess.Popen(
        [str(RAY), "start", *head, "--temp-dir", temp_dir, "--disable-usage-stats", *ports],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = start.communicate(timeout=180)
        assert start.returncode == 0, output
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_processes(start.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_processes(pgid: int, marker: str) -> None:
    """SIGTERM then SIGKILL to process group `pgid` and to any process whose command line names `marker`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [pgid, *pids_naming(marker)]:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if pid == pgid else os.kill)(pid, sig)
        wait_for(lambda: not pids_naming(marker), 5, interval=0.5)


def test_ray_job_submit_with_token_auth(ray_head, fault_free, batch_input, demo_model, tmp_path):
    address, env = ray_head
    out = tmp_path / "job"
    job_id = f"moe-batch-{os.getpid()}-{time.time_ns()}"
    batch = cli_args(batch_input, out, demo_model, *ENGINE_FLAGS)
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", address, "--submission-id", job_id, "--", *batch],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert submit.returncode == 0 and "succeeded" in submit.stdout + submit.stderr, (
        submit.stdout + submit.stderr
    )
    logs = subprocess.run(
        [str(RAY), "job", "logs", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert re.search(r"MapBatches\(MoEPredictor\): \d+/", logs), logs
    assert "batch done: 187 ok, 13 failed" in logs, logs
    assert assert_exactly_once(read_output(out)) == fault_free[0]


# Without a cluster: records, the input's rows, the output directory, the closing line.


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (raw, message)
        for raw, message in MALFORMED.values()
        if "vocabulary" not in message and "max_model" not in message
    ]
    + [
        (b'{"prompt": "x", "seed": 1.5}', "'seed' must be an integer"),
        (b'{"prompt": "x", "temperature": NaN}', "'temperature' must be a finite number"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens must be >= 1"),
        (b'{"prompt": ""}', "'prompt' must be"),
        (b'{"messages": [{"role": "user"}]}', "'messages' must be"),
    ],
)
def test_malformed_records_get_an_error_row(raw, error):
    result = parse_line(3, raw, SamplingParams())
    assert isinstance(result, dict) and result["row"] == 3 and error in result["error"], result


def test_records_get_their_own_sampling_parameters():
    defaults = SamplingParams(max_tokens=32, temperature=0.5)
    request = parse_line(9, b'{"id": 4, "prompt": "x", "max_tokens": 3, "seed": 11, "extra": 1}', defaults)
    assert (request.row, request.id, request.prompt) == (9, 4, "x")
    assert request.params == SamplingParams(max_tokens=3, temperature=0.5, seed=11)


def test_input_rows_have_stable_ids_and_skip_what_is_done(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jsonl").write_bytes(b'{"prompt": "a"}\n\n{oops\n{"prompt": "b"}\n')
    pq.write_table(pa.Table.from_pylist([{"prompt": "c", "seed": None}]), tmp_path / "y.parquet")
    (tmp_path / "z.csv").write_text("ignored\n")
    files = input_files(tmp_path)
    assert list(files) == ["d/x.jsonl", "y.parquet"]
    rows = list(file_rows("d/x.jsonl", files["d/x.jsonl"], skip={1}))
    assert [(r["row_id"], r["record"]) for r in rows] == [
        ("d/x.jsonl:3", b"{oops\n"),
        ("d/x.jsonl:4", b'{"prompt": "b"}\n'),
    ]
    [parquet] = file_rows("y.parquet", files["y.parquet"], skip=set())
    assert (parquet["row_id"], json.loads(parquet["record"])) == ("y.parquet:1", {"prompt": "c"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        input_files(tmp_path / "empty")


def result_table(rows: list[int], error: str | None = None) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {
                "row_id": f"in.jsonl:{n}",
                "source": "in.jsonl",
                "row": n,
                "id": None,
                "token_ids": None if error else [1, 2],
                "completion_tokens": None if error else 2,
                "error": error,
            }
            for n in rows
        ]
    )


def test_output_directory_repairs_what_a_kill_left_and_refuses_a_foreign_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_part(out, "jsonl", result_table([1, 2]))
    write_part(out, "jsonl", result_table([3], error="bad"))
    whole = next(out.glob("part-*.jsonl")).read_bytes()
    (out / "part-torn.jsonl").write_bytes(whole.splitlines(keepends=True)[0] + b'{"row_id": "in.jso')
    (out / ".tmp-1-part-y.jsonl").write_bytes(b'{"row_id"')
    directory = OutputDir(out, "jsonl")
    with pytest.raises(ValueError, match="another batch job is writing"):
        OutputDir(out, "jsonl")
    found = directory.contents()
    assert (found.rows, found.ok, found.failed, found.tokens) == ({"in.jsonl": {1, 2, 3}}, 2, 1, 4)
    assert not list(out.glob(".tmp-*")) and not (out / "part-torn.jsonl").exists()
    assert sorted(r["row"] for r in read_output(out)) == [1, 2, 3]  # the torn part's whole row repeated one
    directory.close()
    afresh = OutputDir(out, "jsonl", overwrite=True)
    assert afresh.contents().rows == {} and not list(out.glob("part-*"))
    afresh.close()
    (out / "hello.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="not a jsonl part file"):
        OutputDir(out, "jsonl")


def test_summary_line():
    summary = Summary(done_before=2, started=0.0)
    summary.finish(ok=3, failed=1, tokens=30, ended=2.0)
    assert summary.line() == (
        "batch done: 3 ok, 1 failed (2 done by an earlier run); 30 tokens generated; "
        "wall time 2.0 s; 2.0 rows/s, 15.0 tokens/s"
    )
