"""The "api" app the OpenAI-API tests run against (tests/test_serve_api.py, tests/test_serve_bad_input.py).

Two expert shards, the whole API surface, a request-size limit. This module is a pytest plugin
(tests/conftest.py names it): the app is deployed once per test module that asks for it and deleted
when that module ends. `engine` is the same model outside Serve, the reference for HTTP results.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from ray import serve

from cluster.engine import Engine
from router.tokenizer import Tokenizer
from tests.conftest import served_app, small_app

MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 4096
LONG_PROMPT = "A computer program"  # its greedy continuation runs past 200 tokens without an end token
EOS_PROMPT = "The harbour"  # its greedy continuation ends with an end token well before 200 tokens
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


def engine_load(app_name: str) -> float:
    handle = serve.get_deployment_handle("MoEEngine", app_name=app_name)
    return handle.record_autoscaling_stats.remote().result(timeout_s=30)["ongoing_sequences"]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def api_url(serve_http, demo_model) -> Iterator[str]:
    options = small_app(
        demo_model,
        expert_shards=2,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=32,
        max_request_bytes=MAX_REQUEST_BYTES,
    )
    with served_app(serve_http, "api", options) as url:
        yield url


@pytest.fixture(scope="module")
def http(api_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(http) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def engine(ray_cluster, demo_model) -> Iterator[Engine]:
    """The same model outside Serve, in the session's cluster: the reference for HTTP results."""
    with Engine(
        demo_model, expert_shards=2, router_cpus=0.5, expert_cpus=0.5, max_model_len=MAX_MODEL_LEN
    ) as eng:
        yield eng


@pytest.fixture(scope="module")
def tokenizer(demo_model) -> Tokenizer:
    return Tokenizer.from_model_dir(demo_model)
