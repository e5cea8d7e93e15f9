"""`moe-cluster batch`: record validation, resumable output, progress, and real runs on Ray.

The runs join the session's Ray cluster through RAY_ADDRESS (as `ray job submit` makes a driver do), except
the Ray Jobs test, which starts its own head (token auth on) and stops it by process group and temp dir.
"""

from __future__ import annotations

import contextlib
import io
import itertools
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

import pytest
import ray

from cluster.batch.job import ResultFile, parse_line
from cluster.batch.progress import Progress
from cluster.engine import Engine
from router.sampling import SamplingParams
from router.tokenizer import Tokenizer
from tests.conftest import free_port
from tests.toolkit import wait_for

CLI = Path(sys.executable).with_name("moe-cluster")
RAY = Path(sys.executable).with_name("ray")
MAX_MODEL_LEN = 128
ENGINE = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5, "max_model_len": MAX_MODEL_LEN}
ENGINE_FLAGS = ["--expert-shards", "2", "--router-cpus", "0.5", "--expert-cpus", "0.5"]
ENGINE_FLAGS += ["--max-model-len", str(MAX_MODEL_LEN), "--progress-interval", "1"]

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
KILL_AFTER_LINES = len(MALFORMED) + 16  # the error lines and at least one call's results
PHRASES = ["The harbour town", "A computer program is", "When you cook rice", "She opened the door"]


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


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), "batch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )


def read_output(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a partial last line"
    return [json.loads(line) for line in data.splitlines()]


def assert_exactly_once(results: list[dict]) -> dict[int, dict]:
    counts = Counter(r["line"] for r in results)
    assert {n for n, c in counts.items() if c > 1} == set()
    assert set(counts) == set(range(1, TOTAL_LINES + 1)) - BLANK_LINES
    return {r["line"]: r for r in results}


@pytest.fixture(scope="module")
def fault_free(batch_input, demo_model, cluster_env, tmp_path_factory) -> tuple[dict[int, dict], str, str]:
    """One complete run with 2 engine replicas: results by input line, stdout, stderr."""
    out = tmp_path_factory.mktemp("fault-free") / "out.jsonl"
    args = ["--input", batch_input, "--output", out, "--model", demo_model, "--replicas", "2"]
    run = run_cli(*args, *ENGINE_FLAGS, env=cluster_env)
    assert run.returncode == 0, run.stderr
    return assert_exactly_once(read_output(out)), run.stdout, run.stderr


def test_every_record_once_and_bad_ones_reported(fault_free):
    by_line, stdout, stderr = fault_free
    for line, (_, message) in MALFORMED.items():
        assert message in by_line[line]["error"], (line, by_line[line])
        assert set(by_line[line]) == {"id", "line", "error"}
    assert by_line[5]["id"] is None and by_line[41]["id"] == "m1"
    for line, result in by_line.items():
        if line in MALFORMED:
            continue
        assert result["id"] == f"r{line}" and "error" not in result, result
        usage = result["usage"]
        assert usage["completion_tokens"] == len(result["token_ids"]) <= valid_record(line)["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert result["finish_reason"] in ("stop", "length") and isinstance(result["text"], str)
    assert f"{200 - len(MALFORMED)} ok, {len(MALFORMED)} failed" in stdout
    assert re.search(r"tokens generated; wall time [\d.]+ s .* [\d.]+ tokens/s", stdout)
    assert re.search(r"^batch: \d+/200 records .* tokens/s, ETA", stderr, re.MULTILINE), stderr


def test_results_equal_engine_generate(fault_free, demo_model, ray_cluster):
    """Each record's completion is what Engine.generate gives for its prompt, greedy and seeded alike."""
    by_line, _, _ = fault_free
    tokenizer = Tokenizer.from_model_dir(demo_model)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for line in by_line.keys() - MALFORMED.keys():
        record = valid_record(line)
        params = (record["max_tokens"], record.get("temperature", 0.0), record.get("top_p", 1.0))
        groups[(*params, record.get("seed"))].append(line)
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


def test_sigkill_mid_way_then_the_same_command_completes_exactly_once(
    fault_free, batch_input, demo_model, cluster_env, tmp_path
):
    out = tmp_path / "out.jsonl"
    # One slower replica (8 sequences at a time, one call in flight) so that the kill lands mid-way.
    args = ["--input", batch_input, "--output", out, "--model", demo_model, "--max-num-seqs", "8"]
    args += ENGINE_FLAGS
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [str(CLI), "batch", *map(str, args)],
            env=cluster_env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        wait_for(
            lambda: (
                proc.poll() is not None
                or (out.exists() and out.read_bytes().count(b"\n") >= KILL_AFTER_LINES)
            ),
            300,
        )
        still_running = proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert still_running, (tmp_path / "killed.log").read_text()
    written = read_output(out)
    assert KILL_AFTER_LINES <= len(written) < 200
    with out.open("ab") as torn:  # what a crash inside a write could leave: a line without its end
        torn.write(b'{"id": "r7", "line": 7, "te')

    rerun = run_cli(*args, env=cluster_env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(written)} done by an earlier run)" in rerun.stdout
    by_line = assert_exactly_once(read_output(out))
    assert by_line == fault_free[0]


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


def pids_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_ray_job_submit_with_token_auth(ray_head, fault_free, batch_input, demo_model, tmp_path):
    address, env = ray_head
    out = tmp_path / "job.jsonl"
    job_id = f"moe-batch-{os.getpid()}-{time.time_ns()}"
    batch = ["--input", str(batch_input), "--output", str(out), "--model", str(demo_model), *ENGINE_FLAGS]
    submit = subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--",
            str(CLI),
            "batch",
            *batch,
        ],
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
    assert re.search(r"batch: \d+/200 records", logs) and "batch done: 187 ok, 13 failed" in logs, logs
    assert assert_exactly_once(read_output(out)) == fault_free[0]


# Without a cluster: records, the output file, the progress display.


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
def test_malformed_records_get_an_error_line(raw, error):
    result = parse_line(3, raw, SamplingParams())
    assert isinstance(result, dict) and result["line"] == 3 and error in result["error"], result


def test_records_get_their_own_sampling_parameters():
    defaults = SamplingParams(max_tokens=32, temperature=0.5)
    request = parse_line(9, b'{"id": 4, "prompt": "x", "max_tokens": 3, "seed": 11, "extra": 1}', defaults)
    assert (request.line, request.id, request.prompt) == (9, 4, "x")
    assert request.params == SamplingParams(max_tokens=3, temperature=0.5, seed=11)


def test_result_file_resumes_after_a_torn_line_and_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1, "line": 1, "error": "x"}\n{"id": 2, "line": 3, "text": "a"}\n{"id": 3, "li')
    out = ResultFile(path)
    assert out.done == {1, 3}
    with pytest.raises(ValueError, match="another batch job is writing"):
        ResultFile(path)
    out.write({"id": 3, "line": 4, "error": "y"})
    out.close()
    assert [r["line"] for r in read_output(path)] == [1, 3, 4]
    afresh = ResultFile(path, overwrite=True)
    assert afresh.done == set() and path.read_bytes() == b""
    afresh.close()
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="--overwrite"):
        ResultFile(path)


def test_progress_log_lines_when_not_a_terminal():
    stream, ticks = io.StringIO(), itertools.count()
    progress = Progress(10, done_before=2, stream=stream, interval_s=5, clock=lambda: float(next(ticks)))
    progress.begin()
    progress.update(ok=3, tokens=30)
    progress.update(failed=1)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("batch: 2/10 records (20%), 0 failed") and lines[-1].startswith("batch: 6/10")
    assert "\r" not in stream.getvalue()
    assert progress.summary().startswith("batch done: 3 ok, 1 failed (2 done by an earlier run); 30 tokens")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal():
    stream, ticks = FakeTerminal(), itertools.count()
    progress = Progress(4, stream=stream, clock=lambda: float(next(ticks)))
    progress.begin()
    progress.update(ok=2, tokens=10)
    progress.close()
    assert stream.getvalue().startswith("\r[......") and stream.getvalue().endswith("\n")
    assert "\r[############............] 2/4 records (50%)" in stream.getvalue()
