"""MoEPredictor in a user's own Ray Data pipeline: one model instance per actor of the pool, the rows'
completions equal Engine.generate's, bad rows answered with an error column and the job going on."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from cluster.batch.processor import MoEPredictor
from cluster.engine import Engine

ENGINE = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5, "max_model_len": 128}
PROMPTS = ["The experts", "Once upon", "def main():", "A", "Ray Data", "import os", "x = 1", "Hello there"]
BAD = {
    "no-prompt": ({"id": "no-prompt"}, "exactly one of 'prompt' and 'messages'"),
    "hot": ({"id": "hot", "prompt": "hi", "temperature": -1.0}, "temperature"),
    # a column holds one Arrow type in every block, so the too-long prompt is text as well
    "long": ({"id": "long", "prompt": "def f(x):\n    return x\n" * 40}, "max_model_len"),
}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    good = [{"id": f"g{i}", "prompt": p, "max_tokens": 6} for i, p in enumerate(PROMPTS)]
    seeded = [
        {"id": f"s{i}", "prompt": p, "max_tokens": 6, "temperature": 0.9, "seed": i}
        for i, p in enumerate(PROMPTS)
    ]
    return good + seeded + [row for row, _ in BAD.values()]


@pytest.fixture(scope="module")
def predicted(ray_cluster, demo_model, rows) -> dict[str, dict]:
    ds = ray.data.from_items(rows).map_batches(
        MoEPredictor,
        fn_constructor_kwargs={"model": str(demo_model), "engine_options": ENGINE},
        concurrency=1,
        batch_size=8,
        num_cpus=0,
    )
    return {row["id"]: row for row in ds.take_all()}


def test_every_row_once_with_its_columns(predicted, rows):
    assert sorted(predicted) == sorted(r["id"] for r in rows)
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "error"} <= set(
        predicted["g0"]
    )


def test_completions_equal_engine_generate(predicted, demo_model, ray_cluster):
    with Engine(demo_model, **ENGINE) as engine:
        greedy = engine.generate(PROMPTS, max_new_tokens=6)
        seeded = [
            engine.generate(p, max_new_tokens=6, temperature=0.9, seed=i)[0] for i, p in enumerate(PROMPTS)
        ]
    for i, (g, s) in enumerate(zip(greedy, seeded, strict=True)):
        assert list(predicted[f"g{i}"]["token_ids"]) == g.token_ids
        assert predicted[f"g{i}"]["text"] == g.text
        assert list(predicted[f"s{i}"]["token_ids"]) == s.token_ids
        assert predicted[f"g{i}"]["error"] is None
        assert predicted[f"g{i}"]["completion_tokens"] == len(g.token_ids)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_row_gets_an_error_and_no_completion(predicted, name):
    row = predicted[name]
    assert BAD[name][1] in row["error"]
    assert row["text"] is None and row["finish_reason"] is None


def test_a_predictor_whose_router_died_starts_a_new_instance_and_serves_the_batch(
    ray_cluster, demo_model, predicted
):
    """The records as JSON text (`record_column`, what `moe-cluster batch` hands it)."""
    predictor = MoEPredictor(model=str(demo_model), engine_options=ENGINE, record_column="record")
    records = [
        b'{"id": "g0", "prompt": "The experts", "max_tokens": 6}',
        b'{"id": 7, "prompt": "Once upon", "max_tokens": 6, "temperature": 0.9, "seed": 1}',
    ]
    batch = {"row": np.array([1, 2]), "record": np.array(records, dtype=object)}
    try:
        lost = predictor.engine.router
        ray.kill(lost, no_restart=True)
        out = predictor(batch)
        assert predictor.engine.router is not lost
    finally:
        predictor.engine.shutdown()
    assert out["token_ids"] == [list(predicted["g0"]["token_ids"]), list(predicted["s1"]["token_ids"])]
    assert "record" not in out and out["error"] == [None, None]
    assert out["id"] == ["g0", "7"] and out["row"] == [1, 2]
