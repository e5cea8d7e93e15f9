"""A RayService's status as `moe-cluster k8s status` reports it: conditions, Serve applications, endpoint."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

import yaml

from cluster.cli.k8s.api import Api, kubernetes_client
from cluster.cli.k8s.manifests import DEFAULT_PORT, KIND, K8sError


@dataclass
class Status:
    name: str
    namespace: str
    ready: bool
    conditions: list[dict[str, Any]]
    service_status: str | None
    cluster: str | None
    pending_cluster: str | None
    applications: dict[str, dict[str, Any]]
    serve_endpoints: int | None
    service: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.service}.{self.namespace}.svc:{self.port}/v1"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "ready": self.ready,
            "conditions": self.conditions,
            "serviceStatus": self.service_status,
            "cluster": self.cluster,
            "pendingCluster": self.pending_cluster,
            "applications": self.applications,
            "numServeEndpoints": self.serve_endpoints,
            "endpoint": self.endpoint,
        }


def parse_status(document: dict[str, Any]) -> Status:
    """The parts of a RayService object (as the API returns it) a user asks about."""
    metadata = document.get("metadata") or {}
    spec = document.get("spec") or {}
    status = document.get("status") or {}
    conditions = [
        {k: c.get(k) for k in ("type", "status", "reason", "message") if c.get(k) is not None}
        for c in status.get("conditions") or []
    ]
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    active = status.get("activeServiceStatus") or {}
    pending = status.get("pendingServiceStatus") or {}
    applications: dict[str, dict[str, Any]] = {}
    for app_name, app in (active.get("applicationStatuses") or {}).items():
        deployments = {
            dep: {k: v for k, v in (info or {}).items() if k in ("status", "message") and v}
            for dep, info in (app.get("serveDeploymentStatuses") or {}).items()
        }
        applications[app_name] = {
            "status": app.get("status"),
            **({"message": app["message"]} if app.get("message") else {}),
            "deployments": deployments,
        }
    port = DEFAULT_PORT
    try:
        config = yaml.safe_load(spec.get("serveConfigV2") or "") or {}
        port = int((config.get("http_options") or {}).get("port", DEFAULT_PORT))
    except (yaml.YAMLError, TypeError, ValueError, AttributeError):
        pass
    name = metadata.get("name", "")
    service = ((spec.get("serveService") or {}).get("metadata") or {}).get("name") or f"{name}-serve-svc"
    return Status(
        name=name,
        namespace=metadata.get("namespace", ""),
        ready=ready,
        conditions=conditions,
        service_status=status.get("serviceStatus"),
        cluster=active.get("rayClusterName"),
        pending_cluster=pending.get("rayClusterName"),
        applications=applications,
        serve_endpoints=status.get("numServeEndpoints"),
        service=service,
        port=port,
    )


def external_address(api: Api, status: Status) -> str | None:
    """The LoadBalancer address of the Serve Service, when it has one (best effort)."""
    kubernetes = kubernetes_client()
    try:
        svc = api.call("read services", api.core().read_namespaced_service, status.service, api.namespace)
    except (kubernetes.client.exceptions.ApiException, K8sError):
        return None
    ingress = (svc.status and svc.status.load_balancer and svc.status.load_balancer.ingress) or []
    for entry in ingress:
        host = entry.ip or entry.hostname
        if host:
            return f"http://{host}:{status.port}/v1"
    return None


def print_status(status: Status, external: str | None, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print(f"{KIND} {status.namespace}/{status.name}: {'ready' if status.ready else 'not ready'}", file=out)
    for c in status.conditions:
        detail = " ".join(x for x in (c.get("reason"), c.get("message")) if x)
        print(f"  condition {c.get('type')}={c.get('status')}" + (f" ({detail})" if detail else ""), file=out)
    if status.service_status:
        print(f"  service status: {status.service_status}", file=out)
    if status.cluster:
        print(f"  Ray cluster: {status.cluster}", file=out)
    if status.pending_cluster:
        print(f"  pending Ray cluster (upgrade in progress): {status.pending_cluster}", file=out)
    if status.serve_endpoints is not None:
        print(f"  Serve endpoints: {status.serve_endpoints}", file=out)
    if not status.applications:
        print("  no Serve application reported yet", file=out)
    for app_name, app in status.applications.items():
        message = f": {app['message']}" if app.get("message") else ""
        print(f"  application {app_name}: {app.get('status')}{message}", file=out)
        for dep, info in app["deployments"].items():
            dep_message = f": {info['message']}" if info.get("message") else ""
            print(f"    deployment {dep}: {info.get('status')}{dep_message}", file=out)
    print(f"endpoint (in the cluster): {status.endpoint}", file=out)
    if external:
        print(f"endpoint (load balancer): {external}", file=out)
    print(
        f"from this machine: kubectl -n {status.namespace} port-forward svc/{status.service} "
        f"{status.port}:{status.port}, then http://127.0.0.1:{status.port}/v1",
        file=out,
    )
