"""What the test_api_* modules share: one Serve app per module, OpenAI error bodies, streamed choices."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import served_app as served
from tests.toolkit import openai_error

__all__ = ["openai_error", "served"]


def app_options(demo_model, **overrides) -> dict:
    """The demo model on one expert shard: what these modules test is the API, not the exchange."""
    return {
        "model": str(demo_model),
        "expert_shards": 1,
        "router_cpus": 0.5,
        "expert_cpus": 0.5,
        "max_model_len": 256,
        "max_num_seqs": 32,
        **overrides,
    }


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def stream_texts(client: openai.OpenAI, chat: bool, **request) -> tuple[dict[int, str], dict[int, str], list]:
    """Each choice's text and finish reason from a stream, and every chunk (for shape checks)."""
    create = client.chat.completions.create if chat else client.completions.create
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(create(stream=True, **request))
    for chunk in chunks:
        for choice in chunk.choices:
            piece = (choice.delta.content or "") if chat else choice.text
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason:
                assert choice.index not in finish, "a choice finished twice"
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


# The fixtures below use the `api_url` fixture of the module that imports them (one app per module).


@pytest.fixture(scope="module")
def client(api_url: str) -> openai.OpenAI:
    return openai_client(api_url)


@pytest.fixture(scope="module")
def http(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, timeout=120) as session:
        yield session


@pytest.fixture(scope="module")
def model_name(http: httpx.Client) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]
