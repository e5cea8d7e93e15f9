"""Prefix caching and preemption through the real Serve HTTP API: the same tokens whatever the cache does.

Three apps on the demo model take turns: prefix caching on, off, and on with a KV cache so small that
concurrent requests preempt one another. Each gets the same requests (greedy and seeded sampling, a
shared prompt prefix longer than the sliding window), in two waves so the second finds the first's blocks.
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from tests.conftest import served_app
from tests.toolkit import wait_for

SHARED = "The harbour town woke slowly. Fishing boats came back before sunrise, and the market opened. " * 3
BASE = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5, "max_model_len": 256, "block_size": 16}
# 4 sequences, 64-token steps: 28 sliding blocks x 4 layers and 12 full blocks x 2 layers of 8 KiB
TINY = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "kv_cache_bytes": (28 * 4 + 12 * 2) * 8192}
REQUESTS = [
    {"prompt": SHARED + "Children ran", "max_tokens": 40, "temperature": 0},
    {"prompt": SHARED + "An old man", "max_tokens": 30, "temperature": 1.0, "seed": 11},
    {"prompt": SHARED + "The merchants", "max_tokens": 36, "temperature": 0.8, "top_p": 0.9, "seed": 12},
    {"prompt": SHARED + "Children ran", "max_tokens": 25, "temperature": 0},
    {"prompt": SHARED + "Bread", "max_tokens": 33, "temperature": 1.0, "seed": 13},
    {"prompt": "A computer program", "max_tokens": 20, "temperature": 0},
]


def _complete(url: str, model: str, body: dict) -> tuple[str, int]:
    response = httpx.post(f"{url}/v1/completions", json={"model": model, **body}, timeout=300)
    assert response.status_code == 200, response.text
    out = response.json()
    return out["choices"][0]["text"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def _chat_stream_usage(url: str, model: str) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": SHARED}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        lines = [line for line in response.iter_lines() if '"usage"' in line]
    return int(re.search(r'"cached_tokens": (\d+)', lines[-1]).group(1))


def _run(url: str) -> tuple[list[str], list[int]]:
    model = httpx.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]
    results = []
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for wave in (REQUESTS[:3], REQUESTS[3:]):
            results += list(pool.map(lambda body: _complete(url, model, body), wave))
    chat = [_chat_stream_usage(url, model) for _ in range(2)]
    return [text for text, _ in results], [cached for _, cached in results] + chat


def _preemptions(metrics_port: int, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    pattern = rf'^ray_moe_preemptions{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
    return max([float(v) for v in re.findall(pattern, text, re.MULTILINE)], default=0.0)


@pytest.mark.slow
def test_same_text_with_prefix_caching_on_off_and_under_preemption(
    serve_http, demo_model, metrics_export_port
) -> None:
    outcomes = {}
    for name, options in {
        "apc-off": {"prefix_caching": False},
        "apc-on": {},
        "apc-tiny": TINY,
    }.items():
        app = {"model": str(demo_model), "served_model_name": name, **BASE, **options}
        with served_app(serve_http, name, app) as url:
            outcomes[name] = _run(url)
            if name == "apc-tiny":
                assert wait_for(lambda: _preemptions(metrics_export_port, "apc-tiny") > 0, 60, 1.0)
    texts, cached = outcomes["apc-off"]
    assert cached == [0] * 8
    for name in ("apc-on", "apc-tiny"):
        assert outcomes[name][0] == texts, name
    on = outcomes["apc-on"][1]
    assert on[3] >= 64 and on[4] >= 64  # the second wave reuses the shared prefix (> the 64-token window)
    assert on[6] == 0 and on[7] > 0  # the same chat prompt, sent twice
