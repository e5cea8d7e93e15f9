"""`moe-cluster k8s`: the RayService of a moe-cluster deployment through the Kubernetes API.

`render` builds a KubeRay `ray.io/v1` RayService for ServeOptions (its serveConfigV2 is exactly what
`moe-cluster serve-config` writes), `apply` creates it or patches the existing one (from flags, or the
RayService of a manifest file such as `helm template` output or k8s/*/manifests.yaml), `status` reads
its conditions and per-application Serve status and prints the endpoint, `delete` removes it.

The API goes through the `kubernetes` client (the `k8s` extra), imported only when a command needs it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

if TYPE_CHECKING:  # imported lazily: they pull in torch and Ray, which `status` and `delete` never need
    from cluster.serve_options import ServeOptions

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
    from cluster.serve_app import serve_config

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


# The API


def _kubernetes():
    try:
        import kubernetes
    except ImportError:
        raise K8sError("the Kubernetes client is not installed: pip install 'moe-cluster[k8s]'") from None
    return kubernetes


@dataclass
class Api:
    """An API client from the kubeconfig (or the pod's service account) and the namespace to use."""

    client: Any
    namespace: str
    host: str

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None, namespace: str | None) -> Api:
        kubernetes = _kubernetes()
        from kubernetes.config.config_exception import ConfigException

        configuration = kubernetes.client.Configuration()
        current_namespace = None
        # Resolved now: the client reads $KUBECONFIG once, when it is imported.
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        try:
            kubernetes.config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
            contexts, active = kubernetes.config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == context), active) if context else active
            current_namespace = (chosen or {}).get("context", {}).get("namespace")
        except (ConfigException, OSError) as err:
            if context or any(Path(p).is_file() for p in kubeconfig.split(os.pathsep)):
                raise K8sError(f"cannot use the kubeconfig {kubeconfig}: {err}") from None
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                raise K8sError(
                    "no kubeconfig: set KUBECONFIG or --kubeconfig, or write ~/.kube/config "
                    f"(and not running in a pod with a service account either): {err}"
                ) from None
            ns_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            current_namespace = ns_file.read_text().strip() if ns_file.is_file() else None
        client = kubernetes.client.ApiClient(configuration)
        return cls(client, namespace or current_namespace or "default", configuration.host)

    def custom(self):
        return _kubernetes().client.CustomObjectsApi(self.client)

    def core(self):
        return _kubernetes().client.CoreV1Api(self.client)

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        """Runs one API call; turns the failures a user can act on into K8sError."""
        kubernetes = _kubernetes()
        from urllib3.exceptions import HTTPError as TransportError

        try:
            return fn(*args, **kwargs)
        except kubernetes.client.exceptions.ApiException as err:
            raise self._explain(what, err) from None
        except TransportError as err:
            raise K8sError(f"cannot reach the Kubernetes API server at {self.host}: {err}") from None

    def _explain(self, what: str, err: Any) -> Exception:
        message = _status_message(err)
        if err.status == 401:
            return K8sError(
                f"unauthorized: the API server at {self.host} refused the credentials ({message})"
            )
        if err.status == 403:
            return K8sError(f"forbidden: cannot {what} in namespace {self.namespace}: {message}")
        return err

    def check_crd(self) -> None:
        """Fails with a clear message when the API server does not know ray.io/v1 RayServices."""
        kubernetes = _kubernetes()
        missing = K8sError(
            f"the RayService CRD ({RESOURCE}/{VERSION}) is not installed on {self.host}: "
            "install the KubeRay operator first (docs/kubernetes.md)"
        )
        try:
            found = self.call("discover the ray.io API", self.custom().get_api_resources, GROUP, VERSION)
        except kubernetes.client.exceptions.ApiException as err:
            if err.status == 404:
                raise missing from None
            raise
        resources = found.get("resources", []) if isinstance(found, dict) else found.resources
        names = {r["name"] if isinstance(r, dict) else r.name for r in resources or []}
        if PLURAL not in names:
            raise missing


def _status_message(err: Any) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        return str(err.reason)


def _is(err: Exception, status: int) -> bool:
    return getattr(err, "status", None) == status


def apply(api: Api, manifest: dict[str, Any], out: TextIO | None = None) -> str:
    """Creates the RayService, or merge-patches it when it exists. Returns "created" or "configured"."""
    out = out or sys.stdout
    kubernetes = _kubernetes()
    name = manifest["metadata"]["name"]
    body = json.loads(json.dumps(manifest))
    body["metadata"]["namespace"] = api.namespace
    custom = api.custom()
    try:
        api.call(
            f"create {RESOURCE}",
            custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            api.namespace,
            PLURAL,
            body,
            field_manager=FIELD_MANAGER,
            **_supported(
                custom.create_namespaced_custom_object, _headers={"Content-Type": "application/json"}
            ),
        )
        outcome = "created"
    except kubernetes.client.exceptions.ApiException as err:
        if not _is(err, 409):
            raise _unexpected(f"create {KIND} {api.namespace}/{name}", err) from None
        try:
            api.call(
                f"patch {RESOURCE}",
                custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                api.namespace,
                PLURAL,
                name,
                body,
                field_manager=FIELD_MANAGER,
                # Older clients have no such parameter and always send a merge patch.
                **_supported(
                    custom.patch_namespaced_custom_object, _content_type="application/merge-patch+json"
                ),
            )
        except kubernetes.client.exceptions.ApiException as err2:
            raise _unexpected(f"patch {KIND} {api.namespace}/{name}", err2) from None
        outcome = "configured"
    print(f"{RESOURCE}/{name} {outcome} in namespace {api.namespace}", file=out)
    return outcome


def _supported(method: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments this client version's method declares (clients before 31 take **kwargs)."""
    parameters = inspect.signature(method).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def _unexpected(what: str, err: Any) -> K8sError:
    return K8sError(f"cannot {what}: {err.status} {_status_message(err)}")


def get(api: Api, name: str) -> dict[str, Any]:
    kubernetes = _kubernetes()
    try:
        return api.call(
            f"get {RESOURCE}",
            api.custom().get_namespaced_custom_object,
            GROUP,
            VERSION,
            api.namespace,
            PLURAL,
            name,
        )
    except kubernetes.client.exceptions.ApiException as err:
        if _is(err, 404):
            raise K8sError(f"no {KIND} {name!r} in namespace {api.namespace}") from None
        raise _unexpected(f"get {KIND} {api.namespace}/{name}", err) from None


def delete(api: Api, name: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    kubernetes = _kubernetes()
    try:
        api.call(
            f"delete {RESOURCE}",
            api.custom().delete_namespaced_custom_object,
            GROUP,
            VERSION,
            api.namespace,
            PLURAL,
            name,
        )
    except kubernetes.client.exceptions.ApiException as err:
        if _is(err, 404):
            raise K8sError(f"no {KIND} {name!r} in namespace {api.namespace}") from None
        raise _unexpected(f"delete {KIND} {api.namespace}/{name}", err) from None
    print(f"{RESOURCE}/{name} deleted from namespace {api.namespace}", file=out)


# Status


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
    kubernetes = _kubernetes()
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


def manifests_for(args: Any, options: ServeOptions | None) -> list[dict[str, Any]]:
    """The RayServices `apply` sends: those of --filename, else one rendered from the flags."""
    if args.k8s_command != "apply":
        return []
    if args.filename:
        services, others = rayservices_in(Path(args.filename))
        if others:
            print(
                f"note: {args.filename} holds {others} other object(s); this command applies only the "
                "RayService (kubectl apply -f for the rest)",
                file=sys.stderr,
            )
        return services
    assert options is not None
    return [rayservice_manifest(options, shape_from(args))]


def shape_from(args: Any) -> ClusterShape:
    return ClusterShape(
        name=args.name,
        namespace=args.namespace,
        image=args.image,
        port=args.port,
        gpus_per_worker=args.gpus_per_worker,
        min_workers=args.min_workers,
        max_workers=max(args.max_workers or args.min_workers, args.min_workers),
        worker_cpus=args.worker_cpus,
        worker_memory=args.worker_memory,
        model_mount=args.model_mount,
        model_claim=args.model_claim,
        model_host_path=args.model_host_path,
        api_keys_secret=args.api_keys_secret,
    )


def names_of(manifests: Iterable[dict[str, Any]]) -> list[str]:
    return [m["metadata"]["name"] for m in manifests]


# The command line (`moe-cluster k8s ...`; cluster/cli.py adds the subparser and calls run_command)


def add_arguments(parser: argparse.ArgumentParser, add_serve_flags: Callable[..., None]) -> None:
    sub = parser.add_subparsers(dest="k8s_command", required=True)

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
        p.add_argument("--context", help="kubeconfig context (default: the current one)")
        p.add_argument("-n", "--namespace", help="default: the manifest's, else the context's, else default")

    def shape(p: argparse.ArgumentParser) -> None:
        add_serve_flags(p, host="0.0.0.0")
        p.add_argument("--name", default="moe-cluster", help="the RayService's name")
        p.add_argument("--image", default="moe-cluster:0.1.0", help="Ray 2.60 image with moe-cluster")
        p.add_argument("--gpus-per-worker", type=int, default=0, help="0: CPU-only workers")
        p.add_argument("--min-workers", type=int, default=1, help="worker pods (autoscaler minimum)")
        p.add_argument("--max-workers", type=int, help="autoscaler maximum (default: --min-workers)")
        p.add_argument("--worker-cpus", default="8")
        p.add_argument("--worker-memory", default="32Gi")
        p.add_argument("--model-mount", default="/models", help="where the model volume is mounted")
        volume = p.add_mutually_exclusive_group()
        volume.add_argument("--model-claim", help="PersistentVolumeClaim holding the model")
        volume.add_argument("--model-host-path", help="node directory holding the model")
        p.add_argument("--api-keys-secret", help="Secret with the API keys under `api-keys`")

    render = sub.add_parser("render", help="print the RayService for these options (YAML)")
    shape(render)
    render.add_argument("--namespace", "-n")
    render.add_argument("-o", "--output", help="file to write (default: stdout)")

    apply_cmd = sub.add_parser("apply", help="create the RayService, or patch it if it exists")
    apply_cmd.add_argument("-f", "--filename", help="a manifest file (e.g. k8s/*/manifests.yaml) to apply")
    shape(apply_cmd)
    connection(apply_cmd)

    status = sub.add_parser("status", help="conditions, Serve application status, endpoint")
    status.add_argument("--name", default="moe-cluster")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    connection(status)

    delete_cmd = sub.add_parser("delete", help="delete the RayService (KubeRay removes its Ray cluster)")
    delete_cmd.add_argument("--name", default="moe-cluster")
    connection(delete_cmd)


def run_command(args: argparse.Namespace, serve_options: Callable[[argparse.Namespace], Any]) -> int:
    """Runs `moe-cluster k8s <command>`; K8sError becomes one line on stderr and exit status 1."""
    try:
        return _run(args, serve_options)
    except K8sError as err:
        print(f"moe-cluster k8s: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, serve_options: Callable[[argparse.Namespace], Any]) -> int:
    command = args.k8s_command
    if command == "render":
        manifest = rayservice_manifest(serve_options(args), shape_from(args))
        text = to_yaml(manifest)
        if args.output:
            Path(args.output).write_text(text)
        else:
            print(text, end="")
        return 0
    manifests = manifests_for(args, None if command != "apply" or args.filename else serve_options(args))
    api = Api.connect(args.kubeconfig, args.context, args.namespace)
    api.check_crd()
    if command == "apply":
        chosen = api.namespace
        for manifest in manifests:
            api.namespace = args.namespace or manifest.get("metadata", {}).get("namespace") or chosen
            apply(api, manifest)
        return 0
    if command == "status":
        status = parse_status(get(api, args.name))
        if args.json:
            print(json.dumps({**status.to_json(), "external": external_address(api, status)}, indent=2))
        else:
            print_status(status, external_address(api, status))
        return 0
    delete(api, args.name)
    return 0
