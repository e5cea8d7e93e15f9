"""The "guarded" Serve app: API keys from a key file; one sequence slot and one waiting slot, hence
waiting, 429, disconnects that free their sequence, and health once an expert actor is gone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray

from cluster.options.serve import ServeOptions
from tests.conftest import served_app
from tests.serve_api_app import CHAT, LONG_PROMPT, engine_load
from tests.toolkit import openai_error, wait_for

# ------------------------------------------------------------------- the "guarded" app: keys and limits

KEYS = ("sk-test-one", "sk-test-two")
AUTH = {"authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def guarded_url(serve_http, demo_model, tmp_path_factory) -> Iterator[str]:
    """API keys from a key file; one sequence slot (and KV cache for one sequence), one waiting slot."""
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"{KEYS[0]}\n\n  {KEYS[1]}  \n")
    options = {
        "model": str(demo_model),
        "expert_shards": 1,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": 128,
        "max_num_seqs": 1,
        "max_waiting": 1,
        "api_key_file": str(key_file),
    }
    with served_app(serve_http, "guarded", options) as url:
        yield url


@pytest.fixture(scope="module")
def model_name(guarded_url) -> str:
    return httpx.get(f"{guarded_url}/v1/models", headers=AUTH, timeout=60).json()["data"][0]["id"]


@pytest.fixture
def guarded(guarded_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded_url, headers=AUTH, timeout=60) as client:
        yield client


AUTH_REQUESTS = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": "model", "prompt": "Hi", "max_tokens": 1}),
    ("POST", "/v1/chat/completions", {"model": "model", "messages": [{"role": "user", "content": "Hi"}]}),
    ("POST", "/v1/completions", {"not": "even valid"}),
]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer sk-wrong",
        f"Basic {KEYS[0]}",
        KEYS[0],
        f"Bearer {KEYS[0]}x",
        f"Bearer {KEYS[0][:-1]}",
    ],
    ids=["none", "empty-bearer", "wrong-key", "basic-scheme", "no-scheme", "longer-key", "shorter-key"],
)
def test_v1_without_a_valid_key_gets_401(guarded_url, authorization):
    headers = {"authorization": authorization} if authorization is not None else {}
    with httpx.Client(base_url=guarded_url, timeout=30) as http:
        for method, path, body in AUTH_REQUESTS:
            error = openai_error(http.request(method, path, json=body, headers=headers), 401)
            assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", KEYS)
def test_either_configured_key_is_accepted(guarded_url, key):
    client = openai.OpenAI(base_url=f"{guarded_url}/v1", api_key=key, max_retries=0, timeout=60)
    [card] = client.models.list().data
    out = client.completions.create(model=card.id, prompt="Hi", max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    chat = client.chat.completions.create(
        model=card.id, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert chat.usage.completion_tokens == 2


def test_health_needs_no_key(guarded_url):
    response = httpx.get(f"{guarded_url}/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_api_keys_come_from_the_environment_and_the_key_file(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n\n")
    monkeypatch.setenv("MOE_CLUSTER_API_KEYS", " env-a, ,env-b ")
    assert ServeOptions(api_key_file=str(key_file)).api_keys() == {"env-a", "env-b", "file-key"}
    monkeypatch.delenv("MOE_CLUSTER_API_KEYS")
    assert ServeOptions().api_keys() == set()


GUARDED_TOKENS = 80  # LONG_PROMPT runs to this length: long enough to hold the slot a few seconds


def _long_request(model: str, stream: bool = True, max_tokens: int = GUARDED_TOKENS) -> dict:
    return {
        "model": model,
        "prompt": LONG_PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _first_token(lines: Iterator[str]) -> dict:
    """Reads SSE lines until the first token chunk: the request is then running.

    Keep `lines` referenced afterwards: dropping the iterator closes the connection.
    """
    for line in lines:
        if line.startswith("data: "):
            return json.loads(line[len("data: ") :])
    raise AssertionError("the stream ended before its first token")


def _rest(lines: Iterator[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def test_full_waiting_queue_gets_429_and_accepted_requests_complete(guarded, model_name):
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)
    with guarded.stream("POST", "/v1/completions", json=_long_request(model_name)) as running:
        assert running.status_code == 200
        running_lines = running.iter_lines()
        first = _first_token(running_lines)
        # the only sequence slot (and the whole KV cache) is taken: the next request is accepted and waits
        with guarded.stream("POST", "/v1/completions", json=_long_request(model_name)) as waiting:
            assert waiting.status_code == 200
            assert wait_for(lambda: engine_load("guarded") == 2, timeout=10)
            # the waiting queue is full: refused at once, streaming or not, either endpoint
            chat = {"model": model_name, "messages": CHAT, "max_tokens": 4}
            for path, body in [
                ("/v1/completions", _long_request(model_name, stream=False)),
                ("/v1/completions", _long_request(model_name, stream=True)),
                ("/v1/chat/completions", chat),
            ]:
                started = time.monotonic()
                refused = guarded.post(path, json=body, timeout=30)
                error = openai_error(refused, 429)
                assert time.monotonic() - started < 10
                assert int(refused.headers["retry-after"]) >= 1
                assert error["type"] == "rate_limit_error"
            assert engine_load("guarded") == 2
            waiting_events = _rest(waiting.iter_lines())
        running_events = [json.dumps(first), *_rest(running_lines)]

    texts = []
    for events in (running_events, waiting_events):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        texts.append("".join(c["choices"][0]["text"] for c in chunks))
    assert texts[0] == texts[1], "the request that waited got the same greedy text"
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)


def test_disconnected_clients_free_their_sequences(guarded, model_name):
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=10)
    request = _long_request(model_name, max_tokens=120)
    running = guarded.send(guarded.build_request("POST", "/v1/completions", json=request), stream=True)
    running_lines = running.iter_lines()
    _first_token(running_lines)
    waiting = guarded.send(guarded.build_request("POST", "/v1/completions", json=request), stream=True)
    assert waiting.status_code == 200
    assert wait_for(lambda: engine_load("guarded") == 2, timeout=10), engine_load("guarded")

    waiting.close()  # a waiting request leaves: its place in the queue is free at once
    assert wait_for(lambda: engine_load("guarded") == 1, timeout=8), engine_load("guarded")
    running.close()  # and the running one, well before its last token: its slot and KV blocks are free
    assert wait_for(lambda: engine_load("guarded") == 0, timeout=8), engine_load("guarded")
    del running_lines

    # the freed slot and cache serve the next request at once
    started = time.monotonic()
    out = guarded.post("/v1/completions", json=_long_request(model_name, stream=False, max_tokens=3))
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    assert time.monotonic() - started < 10


def _expert_pids_of(app_name: str) -> list[int]:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    [replica] = list_actors(
        address=address,
        filters=[("class_name", "=", f"ServeReplica:{app_name}:MoEEngine"), ("state", "=", "ALIVE")],
        detail=True,
    )
    experts = list_actors(
        address=address, filters=[("class_name", "=", "ExpertActor"), ("state", "=", "ALIVE")], detail=True
    )
    pids = [a.pid for a in experts if a.placement_group_id == replica.placement_group_id]
    assert pids, "the replica's expert actors were not found in its placement group"
    return pids


def test_health_is_503_once_an_expert_actor_is_gone(guarded_url):
    """Last test on "guarded": it loses an expert actor (Serve then replaces the replica)."""
    with httpx.Client(base_url=guarded_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        os.kill(_expert_pids_of("guarded")[0], signal.SIGKILL)
        assert wait_for(lambda: http.get("/health").status_code == 503, timeout=20)
        response = http.get("/health")
        assert response.status_code == 503 and response.json()["status"] == "unavailable"
