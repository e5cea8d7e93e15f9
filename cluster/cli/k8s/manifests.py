"""The RayService of a moe-cluster deployment: KubeRay `ray.io/v1`, its serveConfigV2 exactly what
`moe-cluster serve-config` writes, as a manifest and as YAML for people."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.options.serve import ServeOptions

GROUP = "ray.io"
VERSION = "v1"
PLURAL = "rayservices"
KIND = "RayService"
API_VERSION = f"{GROUP}/{VERSION}"
RESOURCE = f"{PLURAL}.{GROUP}"
FIELD_MANAGER = "moe-cluster"
DEFAULT_PORT = 8000


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people: no anchors for repeated dicts, multi-line strings as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False)


class K8sError(Exception):
    """A failure to explain to the user in one line, without a traceback."""


@dataclass(frozen=True)
class ClusterShape:
    """What `render` needs besides ServeOptions: the pods of the Ray cluster."""

    name: str = "moe-cluster"
    namespace: str | None = None
    image: str = "moe-cluster:0.1.0"
    ray_version: str = "2.60.0"
    port: int = DEFAULT_PORT
    gpus_per_worker: int = 0
    min_workers: int = 1
    max_workers: int = 1
    worker_cpus: str = "8"
    worker_memory: str = "32Gi"
    shm_size: str = "8Gi"
    model_mount: str = "/models"
    model_claim: str | None = None
    model_host_path: str | None = None
    api_keys_secret: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod(shape: ClusterShape, options: ServeOptions, head: bool) -> dict[str, Any]:
    ports = [{"name": "serve", "containerPort": shape.port}, {"name": "metrics", "containerPort": 8080}]
    if head:
        ports = [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            *ports,
        ]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape.shm_size}}
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if not head and (shape.model_claim or shape.model_host_path):
        source = (
            {"persistentVolumeClaim": {"claimName": shape.model_claim, "readOnly": True}}
            if shape.model_claim
            else {"hostPath": {"path": shape.model_host_path, "type": "Directory"}}
        )
        volumes.append({"name": "model", **source})
        mounts.append({"name": "model", "mountPath": shape.model_mount, "readOnly": True})
    if head:
        resources = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4", "memory": "8Gi"}}
    else:
        amounts: dict[str, Any] = {"cpu": shape.worker_cpus, "memory": shape.worker_memory}
        if shape.gpus_per_worker:
            amounts["nvidia.com/gpu"] = shape.gpus_per_worker
        resources = {"requests": dict(amounts), "limits": dict(amounts)}
    container: dict[str, Any] = {
        "name": "ray-head" if head else "ray-worker",
        "image": shape.image,
        "ports": ports,
        "resources": resources,
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    if shape.api_keys_secret:
        secret = {"name": shape.api_keys_secret, "key": "api-keys"}
        container["env"] = [{"name": options.api_keys_env, "valueFrom": {"secretKeyRef": secret}}]
    labels = {
        "app.kubernetes.io/name": "moe-cluster",
        "app.kubernetes.io/instance": shape.name,
        "app.kubernetes.io/component": "ray-head" if head else "ray-worker",
    }
    return {
        "metadata": {"labels": labels},
        "spec": {"securityContext": POD_SECURITY, "containers": [container], "volumes": volumes},
    }


def rayservice_manifest(options: ServeOptions, shape: ClusterShape) -> dict[str, Any]:
    """A RayService serving `options`: a CPU-only head, one worker group, autoscaler v2, token auth."""
    from cluster.serve.app import serve_config

    mount = shape.model_mount.rstrip("/") + "/"
    on_volume = shape.model_claim or shape.model_host_path
    if options.model and on_volume and not options.model.startswith(mount):
        raise K8sError(f"--model {options.model} is not under the model volume's mount {shape.model_mount}")
    worker_params = {"num-gpus": str(shape.gpus_per_worker)} if shape.gpus_per_worker else {}
    metadata: dict[str, Any] = {"name": shape.name, "labels": {"app.kubernetes.io/name": "moe-cluster"}}
    metadata["labels"].update(shape.labels)
    if shape.namespace:
        metadata["namespace"] = shape.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(options, port=shape.port), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": shape.ray_version,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "securityContext": CONTAINER_SECURITY},
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(shape, options, head=True),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu" if shape.gpus_per_worker else "cpu",
                        "replicas": shape.min_workers,
                        "minReplicas": shape.min_workers,
                        "maxReplicas": shape.max_workers,
                        "rayStartParams": worker_params,
                        "template": _pod(shape, options, head=False),
                    }
                ],
            },
        },
    }


def rayservices_in(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The RayService documents of a manifest file, and how many other objects it holds."""
    try:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, yaml.YAMLError) as err:
        raise K8sError(f"cannot read {path}: {err}") from None
    services = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    for doc in services:
        if doc.get("apiVersion") != API_VERSION:
            raise K8sError(f"{path}: RayService {doc.get('metadata', {}).get('name')} is not {API_VERSION}")
    if not services:
        raise K8sError(f"{path} holds no {API_VERSION} RayService")
    return services, len(docs) - len(services)
