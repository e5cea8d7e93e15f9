"""Each engine option is defined once (EngineOptions) and reaches the running engine from every front end.

The CLI flags, ServeOptions and the Helm schema derive from EngineOptions; the round trip sets every option
to a value other than its default through `serve-config` and through Helm values, deploys what they wrote on
a real Serve cluster, and reads the config the engine replica runs with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray import serve

from cluster.cli.main import build_parser, main
from cluster.options.engine import EngineConfig, EngineOptions
from cluster.options.flags import engine_flags, flag_name
from cluster.options.serve import ServeOptions
from cluster.serve.app import build_app
from tests.helm_chart import one, render

# A value other than the default for every engine option, runnable on this CPU machine.
NON_DEFAULT = {
    "expert_shards": 2,
    "placement": "round_robin",
    "redundant_experts": 2,
    "eplb": False,
    "eplb_interval_s": 5.0,
    "eplb_window_s": 20.0,
    "device": "cpu",
    "dtype": "float32",
    "router_cpus": 0.5,
    "expert_cpus": 0.5,
    "max_num_seqs": 3,
    "max_num_batched_tokens": 64,
    "max_model_len": 128,
    "max_waiting": 5,
    "kv_cache_bytes": 4 << 20,
    "block_size": 8,
    "prefix_caching": False,
    "gpu_memory_utilization": 0.5,
    "collective_timeout_s": 17.0,
    "placement_strategy": "SPREAD",
    "ready_timeout_s": 120.0,
    "metrics": False,
    "expert_layer_metrics": True,
    "overlap": True,
    "transport": "shm",
}


def cli_args(values: dict) -> list[str]:
    args = []
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        else:
            args += [flag_name(name), str(value)]
    return args


def test_the_table_sets_every_option_off_its_default():
    assert set(NON_DEFAULT) == set(EngineOptions.model_fields), "add the new option to NON_DEFAULT"
    for name, field in EngineOptions.model_fields.items():
        assert NON_DEFAULT[name] != field.get_default(call_default_factory=True), name
    EngineOptions(**NON_DEFAULT)


def test_serve_options_and_engine_config_carry_every_option():
    assert set(EngineOptions.model_fields) <= set(ServeOptions.model_fields)
    assert set(EngineOptions.model_fields) <= set(EngineConfig.model_fields)


@pytest.mark.parametrize("command", ["generate", "serve", "serve-config", "batch", "k8s render"])
def test_every_command_takes_every_engine_option_as_a_flag(command):
    required = ["--input", "in.jsonl", "--output", "out.jsonl"] if command == "batch" else []
    args = build_parser().parse_args([*command.split(), *required, *cli_args(NON_DEFAULT)])
    assert engine_flags(args) == NON_DEFAULT


def test_flags_left_out_fall_back_to_the_defaults():
    assert engine_flags(build_parser().parse_args(["serve-config"])) == {}


def test_bad_flag_values_are_refused_by_the_options_own_checks(capsys):
    assert main(["serve-config", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo(demo_model: Path) -> str:
    return str(demo_model)


@pytest.mark.parametrize(("redundant", "message"), [("17", "between 0 and 16"), ("-1", "redundant_experts")])
@pytest.mark.parametrize("command", ["serve-config", "generate"])
def test_redundant_experts_the_shards_cannot_hold_are_refused_at_start(
    demo, capsys, command, redundant, message
):
    """The demo model has 16 experts: 2 shards hold at most 16 extra slots (one replica of each)."""
    extra = ["--prompt", "hi"] if command == "generate" else []
    args = [command, "--model", demo, "--expert-shards", "2", "--redundant-experts", redundant, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and message in err


def test_serve_app_refuses_redundant_experts_the_shards_cannot_hold(demo):
    with pytest.raises(ValidationError, match="redundant_experts must be between 0 and 16"):
        build_app({"model": demo, "expert_shards": 2, "redundant_experts": 17})


def running_engine_config(ray_cluster, serve_http, args: dict, name: str) -> dict:
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    try:
        handle = serve.get_deployment_handle("MoEEngine", app_name=name)
        return handle.engine_config.remote().result(timeout_s=120)
    finally:
        serve.delete(name)


def assert_arrived(config: dict, model: str) -> None:
    assert Path(config.pop("model_path")) == Path(model).resolve()
    assert config == NON_DEFAULT


def test_serve_config_options_arrive_unchanged_in_the_engine(ray_cluster, serve_http, demo, tmp_path):
    out = tmp_path / "serve.yaml"
    assert main(["serve-config", "--model", demo, *cli_args(NON_DEFAULT), "-o", str(out)]) == 0
    [app] = yaml.safe_load(out.read_text())["applications"]
    assert_arrived(running_engine_config(ray_cluster, serve_http, app["args"], "options-cli"), demo)


def test_helm_values_arrive_unchanged_in_the_engine(ray_cluster, serve_http, demo):
    options = {"model": demo, **NON_DEFAULT}
    sets = [arg for k, v in options.items() for arg in ("--set-json", f"serve.options.{k}={json.dumps(v)}")]
    mount = ["--set", f"model.mountPath={Path(demo).parent}"]  # the chart checks the model is under it
    service = one(render("default", *mount, *sets), "RayService")
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert_arrived(running_engine_config(ray_cluster, serve_http, app["args"], "options-helm"), demo)
