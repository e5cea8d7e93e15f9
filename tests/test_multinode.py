"""Many Ray nodes on one machine: expert actors on different nodes, and a whole node lost under load.

ONE cluster for the module (tests/ray_nodes.py): a head without CPUs and three worker nodes of 2 CPUs,
each node its own `ray start` process group, token auth on. It never touches the session cluster of
tests/conftest.py: everything that must be a Ray driver of it runs in tests/multinode_driver.py as a
subprocess, and HTTP and the state API reach it from here. So the order of test modules cannot break
either cluster. Loss-to-next-good-step times go to RESULTS_PATH (and stdout under `pytest -s`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from cluster.cli.main import _serve_options, build_parser
from cluster.options.flags import engine_flags
from cluster.serve.app import engine_deployment_options, serve_config
from tests.conftest import free_port, hf_greedy, hf_reference
from tests.ray_nodes import RayNodes
from tests.test_batch import read_output
from tests.test_parity import NEW_TOKENS, PROMPTS
from tests.toolkit import (
    Progress,
    Stream,
    pid_gone,
    record_result,
    run_streams,
    stall_after,
    wait_for,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("multinode_driver.py")
RESULTS_PATH = Path("/tmp/moe_cluster_multinode.json")
WORKERS = ("a", "b", "c")
SMALL = {"expert_shards": 2, "router_cpus": 0.5, "expert_cpus": 0.5}

APP = "nodes"
SERVE_OPTIONS = {**SMALL, "max_model_len": 256, "max_num_seqs": 16, "max_waiting": 64}
LOAD_PROMPTS = [
    f"{s} {w}"
    for s in ("The harbour town", "A computer program", "When you cook rice")
    for w in ("and", "was", "in the", "of", "for a", "is")
]
# half greedy, half sampled with a seed of their own: both must come out the same after the loss
LOAD = [(p, {} if i % 2 else {"temperature": 0.9, "seed": 1000 + i}) for i, p in enumerate(LOAD_PROMPTS)]
CONCURRENCY, MAX_TOKENS = 6, 32


@pytest.fixture(scope="module")
def nodes() -> Iterator[RayNodes]:
    with RayNodes(head_cpus=0) as cluster:
        for name in WORKERS:
            cluster.add_worker(name, cpus=2)
        yield cluster


def drive(nodes: RayNodes, command: str, arg: str, timeout: float = 900) -> dict:
    out = subprocess.run(
        [sys.executable, str(DRIVER), command, arg],
        env=nodes.env | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def record(key: str, value: object) -> None:
    record_result(RESULTS_PATH, key, value)


def worker_node_ids(nodes: RayNodes) -> dict[str, str]:
    return {nodes.node_id(name): name for name in WORKERS if any(n.name == name for n in nodes.nodes)}


# ------------------------------------------------------------------------------- the option, end to end


def test_placement_strategy_flag_reaches_engine_and_serve_deployment():
    parser = build_parser()
    generate = parser.parse_args(["generate", "--placement-strategy", "SPREAD"])
    assert engine_flags(generate)["placement_strategy"] == "SPREAD"  # Engine(**flags) -> placement_group()
    serve_args = parser.parse_args(
        ["serve-config", "--placement-strategy", "STRICT_SPREAD", "--device", "cpu"]
    )
    options = _serve_options(serve_args)
    assert engine_deployment_options(options)["placement_group_strategy"] == "STRICT_SPREAD"
    assert serve_config(options)["applications"][0]["args"]["placement_strategy"] == "STRICT_SPREAD"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--placement-strategy", "SCATTER"])


# --------------------------------------------------------------------------------- parity across nodes


def test_engine_matches_transformers_with_experts_on_different_nodes(nodes, checkpoints, tmp_path):
    path = checkpoints["mup-gqa-untied-1dense"]
    ref_logits, ref_tokens = hf_reference(path, PROMPTS, NEW_TOKENS)

    spec = tmp_path / "engine.json"
    options = {**SMALL, "dtype": "float32", "max_num_batched_tokens": 8}
    strategies = ["SPREAD", "STRICT_SPREAD", "PACK"]
    spec.write_text(
        json.dumps(
            {
                "model": str(path),
                "strategies": strategies,
                "options": options,
                "prompts": PROMPTS,
                "new_tokens": NEW_TOKENS,
            }
        )
    )
    runs = {r["strategy"]: r for r in drive(nodes, "engine", str(spec))["runs"]}
    workers = worker_node_ids(nodes)
    for strategy, run in runs.items():
        placement = run["placement"]
        assert placement["strategy"] == strategy and placement["state"] == "CREATED"
        bundle_nodes = placement["bundle_nodes"]
        assert len(bundle_nodes) == 3
        actor_nodes = sorted(a["node_id"] for a in placement["actors"])
        assert sorted(a["class_name"] for a in placement["actors"]) == [
            "ExpertActor",
            "ExpertActor",
            "RouterActor",
        ]
        assert actor_nodes == sorted(bundle_nodes), "an actor is not on its bundle's node"
        assert set(bundle_nodes) <= set(workers), "a bundle on the CPU-less head"
        distinct = len(set(bundle_nodes))
        assert distinct == (1 if strategy == "PACK" else 3), (strategy, bundle_nodes)
        # the transport per pair: shared memory with an expert rank on the router's node, gloo beyond
        router_node = bundle_nodes[0]
        expected = {
            str(rank): "ShmTransport" if bundle_nodes[rank] == router_node else "GlooTransport"
            for rank in (1, 2)
        }
        assert run["transports"] == expected, (strategy, run["transports"], bundle_nodes)

        logits = torch.tensor(run["first_prompt_logits"])
        assert (logits - ref_logits).abs().max().item() < 1e-4, strategy
        assert run["tokens"] == ref_tokens, strategy
    record(
        "placement",
        {s: sorted(workers[n] for n in r["placement"]["bundle_nodes"]) for s, r in runs.items()},
    )


# ------------------------------------------------------------------------------- a batch job across nodes


def test_batch_job_with_experts_on_three_nodes_and_a_cpu_less_head(nodes, demo_model, tmp_path):
    """`moe-cluster batch` as a driver on the head, which has no CPUs (as the Helm chart's head), with
    STRICT_SPREAD: router and expert actors can only be placed on three different worker nodes."""
    from transformers import AfmoeForCausalLM

    prompts = [[5 + (11 * n + k) % 600 for k in range(4 + n % 7)] for n in range(12)]
    lines = [
        json.dumps({"id": f"r{n}", "prompt": p, "max_tokens": 8, "temperature": 0})
        for n, p in enumerate(prompts)
    ]
    lines.insert(5, "{not json")
    source, out = tmp_path / "in.jsonl", tmp_path / "out"
    source.write_text("\n".join(lines) + "\n")
    command = [
        sys.executable,
        "-m",
        "cluster.cli.main",
        "batch",
        "--input",
        str(source),
        "--output",
        str(out),
    ]
    command += ["--model", str(demo_model), "--placement-strategy", "STRICT_SPREAD", "--max-model-len", "128"]
    command += ["--expert-shards", "2", "--router-cpus", "0.5", "--expert-cpus", "0.5"]
    run = subprocess.run(
        command,
        env=nodes.env | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    rows = read_output(out)
    assert sorted(r["row_id"] for r in rows) == sorted(f"in.jsonl:{n}" for n in range(1, 14))
    [bad] = [r for r in rows if r["error"]]
    assert bad["row_id"] == "in.jsonl:6" and "not JSON" in bad["error"]
    model = AfmoeForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    by_id = {r["id"]: r["token_ids"] for r in rows if not r["error"]}
    assert by_id == {f"r{n}": hf_greedy(model, p, 8) for n, p in enumerate(prompts)}


# ------------------------------------------------------------------------------------ node lost (Serve)


@pytest.fixture(scope="module")
def app_url(nodes, demo_model, tmp_path_factory) -> str:
    spec = tmp_path_factory.mktemp("deploy") / "deploy.json"
    options = {"model": str(demo_model), **SERVE_OPTIONS, "placement_strategy": "SPREAD", "device": "cpu"}
    spec.write_text(json.dumps({"app": APP, "port": free_port(), "options": options}))
    return drive(nodes, "deploy", str(spec))["url"]


def run_load(url: str, model: str, progress: Progress | None = None) -> list[Stream]:
    return run_streams(url, model, LOAD, CONCURRENCY, MAX_TOKENS, progress)


@pytest.mark.timeout(1500)
def test_node_lost_under_load_streams_complete_with_the_same_tokens(nodes, app_url):
    model = httpx.get(f"{app_url}/v1/models", timeout=60).json()["data"][0]["id"]
    reference = run_load(app_url, model)
    for s in reference:
        s.check()

    before = drive(nodes, "inspect", APP)
    workers = worker_node_ids(nodes)
    placement = before["placement"]
    assert placement["strategy"] == "SPREAD"
    assert len(set(placement["bundle_nodes"])) == 3, "SPREAD put two bundles on one node"
    busy = {before["replica"]["node_id"], *before["ingress_nodes"]}
    victim_bundle, victim = next(
        (b, n) for b, n in enumerate(placement["bundle_nodes"]) if b > 0 and n not in busy
    )
    assert before["recovery"]["expert_restarts"] == 0

    progress = Progress()
    killed: dict = {}

    def lose_node() -> None:
        progress.wait(len(LOAD_PROMPTS) // 4, 600)
        killed["at"], killed["pids"] = nodes.kill(workers[victim])

    killer = threading.Thread(target=lose_node, daemon=True)
    killer.start()
    streams = run_load(app_url, model, progress)
    killer.join(timeout=60)
    assert "at" in killed, "the node was not killed during the load"
    lost_expert = [a["pid"] for a in placement["actors"] if a["node_id"] == victim]
    assert lost_expert and set(lost_expert) <= set(killed["pids"]), (lost_expert, killed["pids"])
    assert wait_for(lambda: all(pid_gone(pid) for pid in killed["pids"]), 10), "a process of it survived"

    # every stream complete, chunk for chunk the fault-free run's
    for got, ref in zip(streams, reference, strict=True):
        got.check()
        assert got.chunks == ref.chunks, (got.prompt, got.chunks, ref.chunks)

    after = drive(nodes, "inspect", APP)
    assert after["replica"] == before["replica"], "the replica was replaced instead of repaired"
    recovery = after["recovery"]
    # one repair: by the step that failed on the lost rank (recoveries_s), or by the health check that
    # found its expert loop ended first, between two steps. A replacement sent to the lost node before
    # Ray declared it dead is replaced again within the same repair (so restarts may exceed 1).
    assert recovery["generation"] == 1 and 1 <= recovery["expert_restarts"] <= 3, recovery
    moved = after["placement"]
    assert moved["state"] == "CREATED"
    new_node = moved["bundle_nodes"][victim_bundle]
    assert new_node != victim and new_node in worker_node_ids(nodes), "the lost bundle was not re-placed"
    experts = [a for a in moved["actors"] if a["class_name"] == "ExpertActor"]
    assert len(experts) == 2 and victim not in {a["node_id"] for a in experts}

    wait, gap = stall_after(streams, killed["at"])
    assert wait > 0, "no stream was running across the node loss"
    record(
        "node_loss",
        {
            "loss_to_next_token_s": round(wait, 2),  # the longest any running stream waited
            "server_failed_step_to_next_good_step_s": [round(r, 2) for r in recovery["recoveries_s"]],
            "client_longest_pause_s": round(gap, 2),
            "expert_restarts": recovery["expert_restarts"],
            "lost_bundle": victim_bundle,
            "lost_node": workers[victim],
            "moved_to": worker_node_ids(nodes)[new_node],
            "streams": len(streams),
        },
    )
    assert wait_for(lambda: len(nodes.alive_nodes()) == len(nodes.nodes), 30), (
        "the dead node is still listed alive"
    )
