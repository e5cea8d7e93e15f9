"""The Serve config `moe-cluster serve-config` writes, the deployment options, the autoscaling policy.

Everything here runs without a Ray cluster, except `test_serve_command_*`, which runs `moe-cluster serve`
as a real process with its own local Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from ray.serve import Application
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from ray.serve.schema import ServeDeploySchema

from cluster.cli.main import main
from cluster.options.serve import APP_IMPORT_PATH, Autoscaling, ServeOptions
from cluster.serve.app import build_app, engine_deployment_options
from cluster.serve.autoscaling import POLICY_PATH, ongoing_sequences_policy
from tests.conftest import free_port
from tests.toolkit import vendor_data, wait_for

CLI = Path(sys.executable).with_name("moe-cluster")
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env, check=False
    )


def run_main(argv: list[str]) -> int:
    """`main` in this process; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    """The documented command, run as the installed console script."""
    out = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
    result = run_cli(
        "serve-config", "--model", "X", "--expert-shards", "2", "--max-replicas", "3", "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    return out, yaml.safe_load(out.read_text())


def the_app(config: dict) -> dict:
    (app,) = config["applications"]
    return app


# (a) the file is a valid Serve config, by Ray's own model and by the published JSON schema


def test_written_config_validates_against_rays_schema(written):
    _, config = written
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == APP_IMPORT_PATH
    assert app.route_prefix == "/"
    assert app.args == {"model": "X", "expert_shards": 2, "engine_autoscaling": {"max_replicas": 3}}


def test_written_config_validates_against_vendored_json_schema(written):
    _, config = written
    schema = json.loads(vendor_data("ray-serve/serve-deploy-schema.ray-2.60.0.json").read_text())
    jsonschema.validate(config, schema)
    # The schema is a real check, not a blanket accept: a wrongly typed field is refused.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "applications": [{**the_app(config), "import_path": 3}]}, schema)


# (b) the import path resolves, and builds an Application without a cluster


def test_import_path_builds_an_application(written):
    import importlib

    _, config = written
    app_config = the_app(config)
    module_name, attr = app_config["import_path"].split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert builder is build_app
    app = builder(app_config["args"])
    assert isinstance(app, Application)

    ingress = app._bound_deployment
    assert ingress.name == "OpenAIIngress"
    engine_app, options = ingress.init_args
    assert isinstance(engine_app, Application)
    engine = engine_app._bound_deployment
    assert engine.name == "MoEEngine"
    # device `auto` is resolved where the app is built: cpu here, where no GPU is visible.
    resolved = {**app_config["args"], "device": "cpu"}
    assert ServeOptions.model_validate(options) == ServeOptions.model_validate(resolved)
    # The engine deployment really carries the gang-scheduled bundles and the custom policy.
    assert engine._replica_config.placement_group_bundles == [{"CPU": 1.0}] * 3
    scaling = engine._deployment_config.autoscaling_config
    assert scaling.policy.policy_function == POLICY_PATH
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert ingress._deployment_config.autoscaling_config.policy.is_default_policy_function()


# (c) engine and ingress deployment options


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_engine_options_gang_schedule_router_and_expert_bundles(shards):
    opts = engine_deployment_options(ServeOptions(expert_shards=shards, router_cpus=0.5, expert_cpus=2))
    bundles = opts["placement_group_bundles"]
    assert len(bundles) == 1 + shards
    assert bundles[0] == {"CPU": 0.5}
    assert bundles[1:] == [{"CPU": 2.0}] * shards
    # The replica itself runs in bundle 0, so its actor options must fit there exactly.
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert opts["placement_group_strategy"] == "PACK"


def test_engine_options_on_gpu_give_every_bundle_a_gpu():
    opts = engine_deployment_options(ServeOptions(expert_shards=3, device="cuda"))
    assert [b.get("GPU") for b in opts["placement_group_bundles"]] == [1, 1, 1, 1]
    assert opts["ray_actor_options"]["num_gpus"] == 1


def test_engine_autoscaling_config_uses_the_custom_policy_and_the_flags(written):
    _, config = written
    options = ServeOptions.model_validate(the_app(config)["args"])
    scaling = AutoscalingConfig.model_validate(engine_deployment_options(options)["autoscaling_config"])
    policy = "cluster.serve.autoscaling:ongoing_sequences_policy"
    assert scaling.policy.policy_function == POLICY_PATH == policy
    # Serve resolves the import path (to a pickled copy of the function) when it validates the config.
    resolved = scaling.policy.get_policy()
    assert f"{resolved.__module__}:{resolved.__name__}" == policy
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)


def test_serve_config_flags_reach_engine_autoscaling(tmp_path):
    out = tmp_path / "s.yaml"
    argv = ["serve-config", "--min-replicas", "2", "--max-replicas", "5", "--target-ongoing-requests", "3"]
    assert run_main([*argv, "-o", str(out)]) == 0
    options = ServeOptions.model_validate(the_app(yaml.safe_load(out.read_text()))["args"])
    scaling = AutoscalingConfig.model_validate(engine_deployment_options(options)["autoscaling_config"])
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 5, 3.0)
    assert scaling.policy.policy_function == POLICY_PATH


def test_ingress_gets_its_own_autoscaling_config():
    options = ServeOptions(
        engine_autoscaling=Autoscaling(max_replicas=4, target_ongoing_requests=2),
        ingress_autoscaling=Autoscaling(min_replicas=2, max_replicas=6, target_ongoing_requests=100),
    )
    app = build_app(options.model_dump(mode="json"))
    ingress = app._bound_deployment._deployment_config.autoscaling_config
    engine = app._bound_deployment.init_args[0]._bound_deployment._deployment_config.autoscaling_config
    assert (ingress.min_replicas, ingress.max_replicas, ingress.target_ongoing_requests) == (2, 6, 100.0)
    assert ingress.policy.is_default_policy_function()
    assert (engine.min_replicas, engine.max_replicas, engine.target_ongoing_requests) == (1, 4, 2.0)
    assert engine.policy.policy_function == POLICY_PATH
    # Defaults: the ingress is CPU-only and scales on far more concurrent HTTP requests than an engine.
    default = AutoscalingConfig.model_validate(ServeOptions().ingress_autoscaling.to_serve())
    assert default.target_ongoing_requests == 64
    assert default.policy.is_default_policy_function()


def test_ingress_admits_as_many_requests_as_its_autoscaling_target():
    """Serve caps each replica at max_ongoing_requests (default 5); the ingress only holds streams open.

    A cap below the autoscaling target means the target is never reached and extra HTTP requests queue in
    the proxy before they reach the engine's continuous batching.
    """
    options = ServeOptions()
    ingress = build_app(options.model_dump(mode="json"))._bound_deployment._deployment_config
    assert ingress.autoscaling_config.target_ongoing_requests == 64
    assert ingress.max_ongoing_requests >= ingress.autoscaling_config.target_ongoing_requests


# (d) --config round trip, flags over file, and clean errors


def test_config_round_trip_yields_the_same_yaml(written, tmp_path):
    path, _ = written
    result = run_cli("serve-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == path.read_text()


def test_config_accepts_bare_options_and_flags_override_it(tmp_path):
    bare = tmp_path / "options.yaml"
    bare.write_text(
        yaml.safe_dump(
            {
                "model": "/models/a",
                "expert_shards": 4,
                "router_cpus": 2.0,
                "engine_autoscaling": {"min_replicas": 2, "max_replicas": 4},
            }
        )
    )
    out = tmp_path / "serve.yaml"
    argv = [
        "serve-config",
        "--config",
        str(bare),
        "--expert-shards",
        "8",
        "--max-replicas",
        "6",
        "-o",
        str(out),
    ]
    assert run_main(argv) == 0
    args = the_app(yaml.safe_load(out.read_text()))["args"]
    assert args == {
        "model": "/models/a",
        "expert_shards": 8,
        "router_cpus": 2.0,
        "engine_autoscaling": {"min_replicas": 2, "max_replicas": 6},
    }
    again = tmp_path / "again.yaml"
    assert run_main(["serve-config", "--config", str(out), "-o", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_invalid_option_exits_2_with_a_message_and_no_traceback():
    result = run_cli("serve-config", "--expert-shards", "0")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "expert_shards" in result.stderr
    assert "greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


INVALID = {
    "zero-shards": (lambda _: ["--expert-shards", "0"], "expert_shards"),
    "zero-max-replicas": (lambda _: ["--max-replicas", "0"], "max_replicas"),
    "zero-target": (lambda _: ["--target-ongoing-requests", "0"], "target_ongoing_requests"),
    "min-above-max": (lambda _: ["--min-replicas", "3", "--max-replicas", "2"], "max_replicas"),
    "unknown-key": (lambda p: ["--config", _write(p, "u.yaml", "bogus: 1\n")], "bogus"),
    "not-a-mapping": (lambda p: ["--config", _write(p, "l.yaml", "- 1\n")], "mapping"),
    "missing-file": (lambda p: ["--config", str(p / "nope.yaml")], "nope.yaml"),
    "yaml-syntax": (lambda p: ["--config", _write(p, "b.yaml", "a: [\n")], "b.yaml"),
    "no-applications": (lambda p: ["--config", _write(p, "e.yaml", "applications: []\n")], "applications"),
    "bad-device": (lambda _: ["--device", "tpu"], "--device"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_configuration_is_refused_cleanly(case, tmp_path, capsys):
    make_args, mentioned = INVALID[case]
    out = tmp_path / "out.yaml"
    try:
        code = run_main(["serve-config", *make_args(tmp_path), "-o", str(out)])
    except Exception as err:  # what a user would see as a traceback
        pytest.fail(f"serve-config raised {type(err).__name__}: {err}")
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert mentioned in err
    assert not out.exists()


# The policy, with a context built the way Serve's controller builds it


def _context(ongoing: dict[int, float] | None, total_requests: float, current: int = 2, target: float = 4):
    deployment = DeploymentID(name="MoEEngine", app_name="app")
    replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(current)]
    config = AutoscalingConfig(
        min_replicas=1,
        max_replicas=16,
        target_ongoing_requests=target,
        policy={"policy_function": POLICY_PATH},
    )
    metrics = None if ongoing is None else {"ongoing_sequences": {replicas[i]: v for i, v in ongoing.items()}}
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name="MoEEngine",
        app_name="app",
        current_num_replicas=current,
        target_num_replicas=current,
        running_replicas=replicas,
        total_num_requests=total_requests,
        total_queued_requests=0,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=16,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


@pytest.mark.parametrize(
    ("ongoing", "target", "expected"),
    [({0: 12.0, 1: 6.0}, 4, 4.5), ({0: 0.0, 1: 0.0}, 4, 0.0), ({0: 3.0, 1: 1.0}, 1, 4.0), ({0: 7.0}, 2, 3.5)],
)
def test_policy_scales_on_ongoing_sequences(ongoing, target, expected):
    # total_num_requests (HTTP requests) deliberately disagrees: the sequences are what count.
    desired, state = ongoing_sequences_policy(_context(ongoing, total_requests=100.0, target=target))
    assert desired == pytest.approx(expected)
    assert state == {}


def test_policy_accepts_lazily_evaluated_metrics():
    ctx = _context({0: 5.0, 1: 3.0}, total_requests=0.0, target=2)
    metrics = ctx._aggregated_metrics_value
    lazy = _context(None, total_requests=0.0, target=2)
    lazy._aggregated_metrics_value = lambda: metrics
    assert ongoing_sequences_policy(lazy)[0] == pytest.approx(4.0)


@pytest.mark.parametrize("metrics", ["none", "empty", "no-replica-reported"])
def test_policy_falls_back_to_request_count_without_custom_metrics(metrics):
    ctx = _context(None, total_requests=10.0, target=4)
    if metrics == "empty":
        ctx._aggregated_metrics_value = {}
    elif metrics == "no-replica-reported":
        ctx._aggregated_metrics_value = {"ongoing_sequences": {}}
    desired, _ = ongoing_sequences_policy(ctx)
    assert desired == pytest.approx(2.5)


def test_policy_keeps_the_target_while_no_replica_runs():
    ctx = _context(None, total_requests=0.0, current=0)
    ctx.target_num_replicas = 1
    assert ongoing_sequences_policy(ctx) == (1, {})


# `moe-cluster serve` as a real process


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow  # ~35 s alone, 60-70 s next to the session's own Ray cluster on 2 cores
def test_serve_command_serves_and_stops_on_sigterm(demo_model, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MOE_CLUSTER_CACHE"] = str(tmp_path / "cache")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(CLI), "serve", "--port", str(port), "--model", str(demo_model), "--max-model-len", "512"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, f"serve exited early ({proc.returncode}):\n{_tail(tmp_path)}"
            return httpx.get(f"{base}/health", timeout=5).status_code == 200

        assert wait_for(healthy, 120, interval=1, tolerate=(httpx.HTTPError,)), (
            f"not healthy within 120 s:\n{_tail(tmp_path)}"
        )

        body = {"model": demo_model.name, "prompt": "hello there", "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        completion = reply.json()
        assert completion["object"] == "text_completion"
        assert 1 <= completion["usage"]["completion_tokens"] <= 8
        assert completion["choices"][0]["finish_reason"] in ("stop", "length")

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within 60 s of SIGTERM:\n{_tail(tmp_path)}")
        assert code == 0, _tail(tmp_path)
        assert "serving model at" in (tmp_path / "serve.log").read_text()
        assert not _port_open(port), "the HTTP port is still open after serve exited"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tail(tmp_path: Path, lines: int = 40) -> str:
    return "\n".join((tmp_path / "serve.log").read_text().splitlines()[-lines:])
