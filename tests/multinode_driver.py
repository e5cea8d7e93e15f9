"""A Ray driver for tests/test_multinode.py, run as its own process against the cluster at RAY_ADDRESS.

The pytest process may already be the driver of the session cluster (tests/conftest.py), and a process
drives one cluster only; so whatever needs ray.init on the multi-node cluster runs here and prints one
JSON object on its last stdout line.

  engine SPEC.json   Engine runs: for each {"strategy"}: where its actors sit, then greedy tokens
  deploy SPEC.json   the Serve app (HTTP on 127.0.0.1:port, proxy on the head only), left running
  inspect APP        the app's engine replica: its placement group, its actors' nodes, recovery stats
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray.util.state import list_actors

from cluster.engine import Engine


def _actors(pg_id: str) -> list[dict]:
    """The ALIVE router/replica and expert actors of one placement group, with their nodes."""
    alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return [
        {"class_name": a.class_name, "node_id": a.node_id, "pid": a.pid}
        for a in alive
        if a.placement_group_id == pg_id
    ]


def _placement(pg_id: str) -> dict:
    table = ray.util.placement_group_table()[pg_id]
    return {
        "id": pg_id,
        "strategy": table["strategy"],
        "state": table["state"],
        "bundle_nodes": [n for _, n in sorted(table["bundles_to_node_id"].items())],  # by bundle index
        "actors": _actors(pg_id),
    }


def run_engines(spec: dict) -> dict:
    runs = []
    for strategy in spec["strategies"]:
        with Engine(Path(spec["model"]), placement_strategy=strategy, **spec["options"]) as engine:
            pid = engine.info()["pid"]
            [router] = [
                a
                for a in list_actors(filters=[("class_name", "=", "RouterActor")], detail=True)
                if a.pid == pid and a.state == "ALIVE"
            ]
            placement = _placement(router.placement_group_id)
            transports = engine.info()["transports"]
            logits = engine.logits(spec["prompts"][0])
            completions = engine.generate(spec["prompts"], max_new_tokens=spec["new_tokens"], ignore_eos=True)
        runs.append(
            {
                "strategy": strategy,
                "placement": placement,
                "transports": transports,
                "first_prompt_logits": logits.tolist(),
                "tokens": [c.token_ids for c in completions],
            }
        )
    return {"runs": runs}


def deploy(spec: dict) -> dict:
    from ray import serve

    from cluster.serve.app import build_app

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": spec["port"]})
    serve.run(build_app(spec["options"]), name=spec["app"], route_prefix=f"/{spec['app']}")
    return {"url": f"http://127.0.0.1:{spec['port']}/{spec['app']}"}


def inspect(app: str) -> dict:
    from ray import serve

    filters = [("class_name", "=", f"ServeReplica:{app}:MoEEngine"), ("state", "=", "ALIVE")]
    [replica] = list_actors(filters=filters, detail=True)
    handle = serve.get_deployment_handle("MoEEngine", app_name=app)
    ingress = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {
        "replica": {"pid": replica.pid, "node_id": replica.node_id},
        "placement": _placement(replica.placement_group_id),
        "ingress_nodes": [a.node_id for a in ingress if a.class_name.endswith(":OpenAIIngress")],
        "recovery": handle.recovery_stats.remote().result(timeout_s=60),
    }


def main(argv: list[str]) -> int:
    command, arg = argv
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        if command == "inspect":
            result = inspect(arg)
        else:
            spec = json.loads(Path(arg).read_text())
            result = {"engine": run_engines, "deploy": deploy}[command](spec)
    finally:
        ray.shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
