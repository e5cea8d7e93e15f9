"""The Kubernetes API calls of `moe-cluster k8s` (the `kubernetes` client of the `k8s` extra, imported
only when a command needs it), with API errors explained in one line."""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cluster.cli.k8s.manifests import FIELD_MANAGER, GROUP, KIND, PLURAL, RESOURCE, VERSION, K8sError


def kubernetes_client():
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
        kubernetes = kubernetes_client()
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
        return kubernetes_client().client.CustomObjectsApi(self.client)

    def core(self):
        return kubernetes_client().client.CoreV1Api(self.client)

    def call(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        """Runs one API call; turns the failures a user can act on into K8sError."""
        kubernetes = kubernetes_client()
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
        kubernetes = kubernetes_client()
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
    kubernetes = kubernetes_client()
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


def _on_named(api: Api, verb: str, method: Any, name: str) -> Any:
    """One call on the named RayService; a 404 says which one is missing."""
    kubernetes = kubernetes_client()
    try:
        return api.call(f"{verb} {RESOURCE}", method, GROUP, VERSION, api.namespace, PLURAL, name)
    except kubernetes.client.exceptions.ApiException as err:
        if _is(err, 404):
            raise K8sError(f"no {KIND} {name!r} in namespace {api.namespace}") from None
        raise _unexpected(f"{verb} {KIND} {api.namespace}/{name}", err) from None


def get(api: Api, name: str) -> dict[str, Any]:
    return _on_named(api, "get", api.custom().get_namespaced_custom_object, name)


def delete(api: Api, name: str, out: TextIO | None = None) -> None:
    _on_named(api, "delete", api.custom().delete_namespaced_custom_object, name)
    out = out or sys.stdout
    print(f"{RESOURCE}/{name} deleted from namespace {api.namespace}", file=out)
