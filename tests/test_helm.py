"""The Helm chart (helm/moe-cluster) and the reference manifests (k8s/), checked with the real tools.

- `helm lint --strict` and `helm template` with a real helm binary (.ci/run installs it); without one
  these tests fail, they do not skip.
- Built-in kinds go through `kubernetes-validate --strict` for a recent Kubernetes; so do the pod
  templates inside the KubeRay objects, as Pods.
- RayService and RayJob go through the OpenAPI schemas of KubeRay's CRDs (tests/helm_chart.py), made
  strict the way the API server is: a field the schema does not name would be pruned, so it fails here.
- spec.serveConfigV2 must equal `serve_config(ServeOptions(**serve.options))` (what `moe-cluster
  serve-config` writes), validate as Ray's ServeDeploySchema (and Ray's published JSON schema) and each
  autoscaling config as AutoscalingConfig, and its import path must import and build the application.
- values.schema.json: serve.options is ServeOptions' own schema (`python -m tests.test_helm` rewrites it).

tests/test_helm_render.py checks what the chart renders, piece by piece.
"""

from __future__ import annotations

import copy
import importlib
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve import Application
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from cluster.options.serve import APP_IMPORT_PATH, ServeOptions
from cluster.serve.app import build_app, engine_deployment_options, serve_config
from cluster.serve.autoscaling import POLICY_PATH
from tests.helm_chart import (
    BUILT_IN_GROUPS,
    CASES,
    CHART,
    KUBERNETES_VERSION,
    REFERENCE,
    crd_errors,
    helm,
    merged_values,
    of_kind,
    one,
    pods_of,
    ray_clusters,
    render,
    serve_options_schema,
    validate_metadata,
)
from tests.toolkit import vendor_data

# Lint


@pytest.mark.parametrize("case", ["default", "trinity-large", "cpu-dev", "trinity-mini", "batch"])
def test_helm_lint_strict(case):
    result = helm("lint", "--strict", str(CHART), *CASES[case])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


# Built-in kinds: kubernetes-validate --strict


@pytest.mark.parametrize("case", list(CASES))
def test_built_in_kinds_validate_strictly(case):
    docs = render(case)
    built_in = [d for d in docs if d["apiVersion"] in BUILT_IN_GROUPS]
    assert built_in, "nothing built-in rendered"
    for doc in built_in:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("case", list(CASES))
def test_ray_pod_templates_validate_as_pods(case):
    """The pod templates KubeRay turns into pods, checked as the Pods they become."""
    docs = render(case)
    templates = [t for cluster in ray_clusters(docs) for _, t in pods_of(cluster)]
    templates += [d["spec"]["submitterPodTemplate"] for d in of_kind(docs, "RayJob")]
    assert templates
    for index, template in enumerate(templates):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {**template.get("metadata", {}), "name": f"pod-{index}"},
            "spec": template["spec"],
        }
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_is_strict_here():
    (policy,) = of_kind(render("default"), "NetworkPolicy")
    policy["spec"]["podSelektor"] = policy["spec"].pop("podSelector")
    with pytest.raises(kubernetes_validate.ValidationError, match="podSelektor"):
        kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)


# KubeRay kinds: the CRDs' schemas


@pytest.mark.parametrize("case", list(CASES))
def test_kuberay_objects_match_the_crd_schemas(case):
    docs = render(case)
    kuberay = [d for d in docs if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in kuberay} == ({"RayService", "RayJob"} if case == "batch" else {"RayService"})
    for doc in kuberay:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(doc) == []
        validate_metadata(doc["metadata"])


def test_the_crd_check_rejects_unknown_fields_and_wrong_types():
    service = one(render("default"), "RayService")
    misspelt = copy.deepcopy(service)
    misspelt["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in crd_errors(misspelt))
    deep = copy.deepcopy(service)
    deep["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 8
    assert any("gpus" in e for e in crd_errors(deep))
    wrong = copy.deepcopy(service)
    wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    assert any("maxReplicas" in e for e in crd_errors(wrong))
    bad_enum = copy.deepcopy(service)
    bad_enum["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions" in e for e in crd_errors(bad_enum))


# serveConfigV2: the same document as `moe-cluster serve-config`


@pytest.mark.parametrize("case", ["default", *REFERENCE])
def test_serve_config_v2_is_what_serve_config_writes(case):
    values = merged_values(case)
    service = one(render(case), "RayService")
    rendered = yaml.safe_load(service["spec"]["serveConfigV2"])

    options = ServeOptions(**values["serve"]["options"])
    expected = serve_config(options, host="0.0.0.0", port=values["serve"]["port"])
    (app,) = rendered["applications"]
    (expected_app,) = expected["applications"]
    # The chart writes the options as given; serve-config leaves out defaults. Same ServeOptions.
    assert ServeOptions.model_validate(app["args"]) == options
    assert ServeOptions.model_validate(app["args"]).model_dump(exclude_defaults=True) == expected_app["args"]
    assert {**rendered, "applications": [{**app, "args": None}]} == {
        **expected,
        "applications": [{**expected_app, "args": None}],
    }


@pytest.mark.parametrize("case", ["default", *REFERENCE])
def test_serve_config_v2_passes_rays_published_json_schema(case):
    config = yaml.safe_load(one(render(case), "RayService")["spec"]["serveConfigV2"])
    schema = vendor_data("ray-serve/serve-deploy-schema.ray-2.60.0.json")
    jsonschema.validate(config, json.loads(schema.read_text()))


@pytest.mark.parametrize("case", ["default", *REFERENCE])
def test_serve_config_v2_passes_rays_schema_and_builds(case):
    service = one(render(case), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (app_schema,) = schema.applications
    assert app_schema.import_path == APP_IMPORT_PATH

    options = ServeOptions.model_validate(app_schema.args)
    engine_options = engine_deployment_options(options)
    engine_scaling = AutoscalingConfig.model_validate(engine_options["autoscaling_config"])
    assert engine_scaling.policy.policy_function == POLICY_PATH
    ingress_scaling = AutoscalingConfig.model_validate(options.ingress_autoscaling.to_serve())
    assert ingress_scaling.policy.is_default_policy_function()

    module_name, attr = app_schema.import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert builder is build_app
    app = builder(app_schema.args)
    assert isinstance(app, Application)
    engine = app._bound_deployment.init_args[0]._bound_deployment
    bundles = engine._replica_config.placement_group_bundles
    assert len(bundles) == 1 + options.expert_shards
    gpu = options.device == "cuda"
    assert all(("GPU" in b) == gpu for b in bundles)
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (
        options.engine_autoscaling.min_replicas,
        options.engine_autoscaling.max_replicas,
    )


def test_large_integers_survive_the_template():
    """Helm reads numbers as floats; a KV budget of 40 GiB must still reach Ray as that integer."""
    service = one(render("trinity-large"), "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["kv_cache_bytes"] == 40 * 2**30
    assert isinstance(app["args"]["kv_cache_bytes"], int)


def test_reference_deployments_fit_their_gpus():
    """Every model instance (router + shards, one GPU each) fits in the GPUs of the worker pods."""
    for case in ("trinity-large", "trinity-mini"):
        values = merged_values(case)
        options = ServeOptions(**values["serve"]["options"])
        groups = values["rayClusterConfig"]["workerGroupSpecs"]
        gpus = sum(g["gpus"] * g["maxReplicas"] for g in groups)
        assert (1 + options.expert_shards) * options.engine_autoscaling.max_replicas <= gpus, case
    large = ServeOptions(**merged_values("trinity-large")["serve"]["options"])
    assert large.expert_shards + 1 == 16  # one instance over 2 nodes x 8 GPUs


# values.schema.json


def _schema_error(*args: str) -> str:
    result = helm("template", "x", str(CHART), *args)
    assert result.returncode != 0, "helm accepted values the schema should reject"
    return result.stderr


@pytest.mark.parametrize(
    ("args", "mentioned"),
    [
        (["--set", "serve.options.max_num_seq=8"], "max_num_seq"),
        (["--set", "monitoring.enabeld=false"], "enabeld"),
        (["--set", "rayClusterConfig.headGroupSpec.nodeSelecter.a=b"], "nodeSelecter"),
        (["--set", "rayClusterConfig.autoscalerOptions.versoin=v2"], "versoin"),
    ],
)
def test_values_schema_rejects_a_misspelt_key(args, mentioned):
    error = _schema_error(*args)
    assert "additional properties" in error and mentioned in error, error


@pytest.mark.parametrize(
    ("args", "mentioned"),
    [
        (["--set-json", 'serve.options.expert_shards="8"'], "/serve/options/expert_shards"),
        (["--set", "serve.options.device=tpu"], "/serve/options/device"),
        (["--set-json", "podDisruptionBudget.enabled=1"], "/podDisruptionBudget/enabled"),
        (["--set-json", 'rayClusterConfig.headGroupSpec.rayStartParams={"num-gpus": 0}'], "num-gpus"),
        (["--set-json", 'rayClusterConfig.workerGroupSpecs=[{"groupName": "g", "gpus": "8"}]'], "gpus"),
        (["--set", "rayClusterConfig.authOptions.mode=tokens"], "/rayClusterConfig/authOptions/mode"),
    ],
)
def test_values_schema_rejects_a_wrong_type(args, mentioned):
    error = _schema_error(*args)
    assert mentioned in error, error


def test_values_schema_serve_options_are_serve_options():
    """serve.options in values.schema.json is ServeOptions' own schema (kept in step by this test)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_chart = schema["properties"]["serve"]["properties"]["options"]
    assert {k: v for k, v in in_chart.items() if k != "description"} == serve_options_schema(), (
        "serve.options in values.schema.json differs from ServeOptions: python -m tests.test_helm rewrites it"
    )
    assert set(in_chart["properties"]) == set(ServeOptions.model_fields)


if __name__ == "__main__":
    # python -m tests.test_helm: rewrite serve.options in values.schema.json after ServeOptions changed.
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    serve = schema["properties"]["serve"]["properties"]
    serve["options"] = {**serve_options_schema(), "description": serve["options"].get("description")}
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {path}")
