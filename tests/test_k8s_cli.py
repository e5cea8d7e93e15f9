"""`moe-cluster k8s` against a loopback HTTP server that records every request.

No Kubernetes API server can be installed here, so these tests check the wire, not a cluster: the
requests the real `kubernetes` client sends (method, path with API group, version and plural, query,
content type, body) for apply (create, then patch when it exists), status, delete, and how the command
reads the server's answers: a RayService status document, Status errors (CRD missing, forbidden),
no kubeconfig, an unreachable server. The answers are shaped like the API server's and KubeRay's.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from cluster.cli.k8s.command import shape_from
from cluster.cli.k8s.manifests import rayservice_manifest
from cluster.cli.main import _serve_options, build_parser, main
from cluster.options.serve import ServeOptions
from cluster.serve.app import serve_config
from tests.conftest import free_port
from tests.test_helm import crd_errors
from tests.toolkit import send_json

REPO = Path(__file__).resolve().parents[1]
BASE = "/apis/ray.io/v1"
DISCOVERY = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "ray.io/v1",
    "resources": [
        {"name": "rayclusters", "singularName": "raycluster", "namespaced": True, "kind": "RayCluster",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "rayservices", "singularName": "rayservice", "namespaced": True, "kind": "RayService",
         "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "rayservices/status", "singularName": "", "namespaced": True, "kind": "RayService",
         "verbs": ["get", "patch", "update"]},
    ],
}  # fmt: skip


def status_error(code: int, reason: str, message: str, **details: Any) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    }


class Recorder:
    """A fake API server: answers from a table of (method, path) -> [(status, body), ...], records all."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                recorder.requests.append(
                    {
                        "method": self.command,
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "content_type": self.headers.get("Content-Type"),
                        "authorization": self.headers.get("Authorization"),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                answers = recorder.routes.get((self.command, url.path))
                if answers:
                    status, body = answers.pop(0) if len(answers) > 1 else answers[0]
                else:
                    status, body = (
                        404,
                        status_error(404, "NotFound", "the server could not find the requested resource"),
                    )
                send_json(self, status, body)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.routes[(method, path)] = list(answers)

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_kubeconfig(path: Path, server: str, namespace: str | None = "team-a") -> Path:
    context: dict[str, Any] = {"cluster": "loopback", "user": "tester"}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "loopback", "cluster": {"server": server}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "loopback", "context": context}],
        "current-context": "loopback",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def api(tmp_path, monkeypatch):
    server = Recorder()
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", server.url)))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    server.on("GET", BASE, (200, DISCOVERY))
    yield server
    server.close()


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


COLLECTION = f"{BASE}/namespaces/team-a/rayservices"
FLAGS = [
    "--model",
    "/models/demo",
    "--expert-shards",
    "2",
    "--max-replicas",
    "3",
    "--model-host-path",
    "/mnt/m",
]


# apply


def test_apply_creates_the_rayservice(api, capsys):
    api.on("POST", COLLECTION, (201, {"kind": "RayService", "metadata": {"name": "moe-cluster"}}))
    code, out, err = run(["k8s", "apply", *FLAGS], capsys)
    assert code == 0, err
    assert api.calls() == [("GET", BASE), ("POST", COLLECTION)]
    post = api.requests[1]
    assert post["authorization"] == "Bearer test-token"
    assert post["content_type"] == "application/json"
    assert post["query"] == {"fieldManager": ["moe-cluster"]}
    body = post["body"]
    assert (body["apiVersion"], body["kind"]) == ("ray.io/v1", "RayService")
    assert body["metadata"] == {
        "name": "moe-cluster",
        "namespace": "team-a",
        "labels": {"app.kubernetes.io/name": "moe-cluster"},
    }
    options = ServeOptions(model="/models/demo", expert_shards=2, engine_autoscaling={"max_replicas": 3})
    assert yaml.safe_load(body["spec"]["serveConfigV2"]) == serve_config(options)
    assert crd_errors(body) == []
    assert "rayservices.ray.io/moe-cluster created in namespace team-a" in out


def test_apply_patches_an_existing_rayservice(api, capsys):
    conflict = status_error(409, "AlreadyExists", 'rayservices.ray.io "moe-cluster" already exists')
    api.on("POST", COLLECTION, (409, conflict))
    api.on("PATCH", f"{COLLECTION}/moe-cluster", (200, {"kind": "RayService", "metadata": {"name": "x"}}))
    code, out, err = run(["k8s", "apply", *FLAGS], capsys)
    assert code == 0, err
    assert api.calls() == [("GET", BASE), ("POST", COLLECTION), ("PATCH", f"{COLLECTION}/moe-cluster")]
    create, patch = api.requests[1], api.requests[2]
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["query"] == {"fieldManager": ["moe-cluster"]}
    assert patch["body"] == create["body"]
    assert "configured" in out


def test_apply_a_rendered_manifest_file(api, capsys):
    """`apply -f` on a reference manifest sends its RayService, in the manifest's namespace."""
    manifest = REPO / "k8s" / "trinity-mini" / "manifests.yaml"
    (service,) = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "RayService"]
    path = f"{BASE}/namespaces/moe-cluster/rayservices"
    api.on("POST", path, (201, service))
    code, _, err = run(["k8s", "apply", "-f", str(manifest)], capsys)
    assert code == 0, err
    assert api.calls() == [("GET", BASE), ("POST", path)]
    assert api.requests[1]["body"] == service
    assert "only the RayService" in err

    api.requests.clear()
    other = f"{BASE}/namespaces/elsewhere/rayservices"
    api.on("POST", other, (201, service))
    assert run(["k8s", "apply", "-f", str(manifest), "-n", "elsewhere"], capsys)[0] == 0
    assert api.calls() == [("GET", BASE), ("POST", other)]
    assert api.requests[1]["body"]["metadata"]["namespace"] == "elsewhere"


def test_render_prints_what_apply_sends(tmp_path, capsys):
    code, out, err = run(["k8s", "render", *FLAGS, "--gpus-per-worker", "8", "--max-workers", "2"], capsys)
    assert code == 0, err
    manifest = yaml.safe_load(out)
    assert crd_errors(manifest) == []
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"], group["rayStartParams"]) == (1, 2, {"num-gpus": "8"})
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    # `apply` without -f sends this same document (built by the same function from the same flags).
    parsed = build_parser().parse_args(
        ["k8s", "apply", *FLAGS, "--gpus-per-worker", "8", "--max-workers", "2"]
    )
    assert manifest == rayservice_manifest(_serve_options(parsed), shape_from(parsed))


# status


def rayservice_document(ready: bool) -> dict:
    """A RayService as KubeRay reports it while serving (status fields as in the v1 CRD)."""
    service = yaml.safe_load(
        yaml.safe_dump(rayservice_manifest(ServeOptions(model="/models/demo"), shape_from(_shape_args())))
    )
    service["metadata"].update({"namespace": "team-a", "resourceVersion": "4711", "generation": 2})
    reason = "NonZeroServeEndpoints" if ready else "ZeroServeEndpoints"
    service["status"] = {
        "conditions": [
            {"type": "Ready", "status": str(ready), "reason": reason,
             "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "UpgradeInProgress", "status": "False", "reason": "NoPendingCluster",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
        "serviceStatus": "Running" if ready else "",
        "numServeEndpoints": 2 if ready else 0,
        "observedGeneration": 2,
        "activeServiceStatus": {
            "rayClusterName": "moe-cluster-x7k2p",
            "applicationStatuses": {
                "moe-cluster": {
                    "status": "RUNNING" if ready else "DEPLOYING",
                    "serveDeploymentStatuses": {
                        "MoEEngine": {"status": "HEALTHY" if ready else "UPDATING",
                                      "message": "" if ready else "Deploying: waiting for placement group"},
                        "OpenAIIngress": {"status": "HEALTHY"},
                    },
                }
            },
        },
        "pendingServiceStatus": {},
    }  # fmt: skip
    return service


def _shape_args():
    return build_parser().parse_args(["k8s", "render", "--name", "moe-cluster"])


def test_status_reads_conditions_applications_and_endpoint(api, capsys):
    api.on("GET", f"{COLLECTION}/moe-cluster", (200, rayservice_document(ready=True)))
    load_balancer = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {"name": "moe-cluster-serve-svc", "namespace": "team-a"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 8000}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
    }
    api.on("GET", "/api/v1/namespaces/team-a/services/moe-cluster-serve-svc", (200, load_balancer))
    code, out, err = run(["k8s", "status"], capsys)
    assert code == 0, err
    assert api.calls() == [
        ("GET", BASE),
        ("GET", f"{COLLECTION}/moe-cluster"),
        ("GET", "/api/v1/namespaces/team-a/services/moe-cluster-serve-svc"),
    ]
    assert "RayService team-a/moe-cluster: ready" in out
    assert "condition Ready=True (NonZeroServeEndpoints)" in out
    assert "Ray cluster: moe-cluster-x7k2p" in out
    assert "application moe-cluster: RUNNING" in out
    assert "deployment MoEEngine: HEALTHY" in out
    assert "endpoint (in the cluster): http://moe-cluster-serve-svc.team-a.svc:8000/v1" in out
    assert "endpoint (load balancer): http://203.0.113.7:8000/v1" in out


def test_status_json_while_deploying(api, capsys):
    api.on("GET", f"{COLLECTION}/moe-cluster", (200, rayservice_document(ready=False)))
    code, out, err = run(["k8s", "status", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["ready"] is False
    assert report["applications"]["moe-cluster"]["status"] == "DEPLOYING"
    engine = report["applications"]["moe-cluster"]["deployments"]["MoEEngine"]
    assert engine == {"status": "UPDATING", "message": "Deploying: waiting for placement group"}
    assert report["endpoint"] == "http://moe-cluster-serve-svc.team-a.svc:8000/v1"
    assert report["external"] is None  # the Service lookup got a 404: no load balancer to report


def test_status_of_a_missing_rayservice(api, capsys):
    missing = status_error(
        404, "NotFound", 'rayservices.ray.io "nope" not found', name="nope", kind="rayservices"
    )
    api.on("GET", f"{COLLECTION}/nope", (404, missing))
    code, _, err = run(["k8s", "status", "--name", "nope"], capsys)
    assert code == 1
    assert err.strip() == "moe-cluster k8s: no RayService 'nope' in namespace team-a"


# delete


def test_delete(api, capsys):
    api.on("DELETE", f"{COLLECTION}/moe-cluster", (200, {"kind": "Status", "status": "Success"}))
    code, out, err = run(["k8s", "delete", "-n", "team-a"], capsys)
    assert code == 0, err
    assert api.calls() == [("GET", BASE), ("DELETE", f"{COLLECTION}/moe-cluster")]
    assert "deleted" in out


# friendly errors


def test_crd_not_installed(api, capsys):
    api.on(
        "GET", BASE, (404, status_error(404, "NotFound", "the server could not find the requested resource"))
    )
    code, out, err = run(["k8s", "apply", *FLAGS], capsys)
    assert code == 1 and out == ""
    assert "the RayService CRD (rayservices.ray.io/v1) is not installed" in err
    assert "install the KubeRay operator" in err
    assert "Traceback" not in err
    assert api.calls() == [("GET", BASE)]  # nothing was sent to create


def test_forbidden(api, capsys):
    message = (
        'rayservices.ray.io is forbidden: User "tester" cannot create resource "rayservices" in API group '
        '"ray.io" in the namespace "team-a"'
    )
    api.on(
        "POST", COLLECTION, (403, status_error(403, "Forbidden", message, group="ray.io", kind="rayservices"))
    )
    code, _, err = run(["k8s", "apply", *FLAGS], capsys)
    assert code == 1
    assert (
        err.strip()
        == f"moe-cluster k8s: forbidden: cannot create rayservices.ray.io in namespace team-a: {message}"
    )


def test_no_kubeconfig(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, out, err = run(["k8s", "status"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("moe-cluster k8s: no kubeconfig: set KUBECONFIG or --kubeconfig")
    assert "Traceback" not in err


def test_unreachable_api_server(tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    code, _, err = run(["k8s", "delete"], capsys)
    assert code == 1
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in err


def test_namespace_defaults_to_default_without_one_in_the_context(tmp_path, monkeypatch, capsys):
    server = Recorder()
    try:
        kubeconfig = write_kubeconfig(tmp_path / "kc", server.url, namespace=None)
        server.on("GET", BASE, (200, DISCOVERY))
        server.on("DELETE", f"{BASE}/namespaces/default/rayservices/moe-cluster", (200, {"kind": "Status"}))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        code, _, err = run(["k8s", "delete", "--kubeconfig", str(kubeconfig)], capsys)
        assert code == 0, err
        assert server.calls()[-1] == ("DELETE", f"{BASE}/namespaces/default/rayservices/moe-cluster")
    finally:
        server.close()
