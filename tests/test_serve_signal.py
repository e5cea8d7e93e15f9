"""`serve` as a real process (this checkout's code) stops within 10 s of SIGTERM or SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10.0


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow  # a Ray cluster of its own: ~40 s per case on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_serve_exits_soon_after_a_stop_signal(demo_model, tmp_path, sig):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        "-m",
        "cluster.cli.main",
        "serve",
        "--port",
        str(port),
        "--model",
        str(demo_model),
    ]
    with (tmp_path / "serve.log").open("w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(base):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "not healthy within 180 s"
            time.sleep(1)
        body = {"model": demo_model.name, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
        signalled = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.monotonic() - signalled
        assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert took < STOP_WITHIN_S, f"serve took {took:.1f} s to exit"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
