"""`moe-cluster k8s`: the RayService of a moe-cluster deployment through the Kubernetes API.

`render` builds a KubeRay `ray.io/v1` RayService for ServeOptions (its serveConfigV2 is exactly what
`moe-cluster serve-config` writes), `apply` creates it or patches the existing one (from flags, or the
RayService of a manifest file such as `helm template` output or k8s/*/manifests.yaml), `status` reads
its conditions and per-application Serve status and prints the endpoint, `delete` removes it.

The API goes through the `kubernetes` client (the `k8s` extra), imported only when a command needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cluster.cli.k8s.api import Api, apply, delete, get
from cluster.cli.k8s.manifests import ClusterShape, K8sError, rayservice_manifest, rayservices_in, to_yaml
from cluster.cli.k8s.status import external_address, parse_status, print_status
from cluster.options.serve import ServeOptions


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
    """The ClusterShape of the flags: every field that has a flag of the same name (not shm_size, labels)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClusterShape) if hasattr(args, f.name)}
    given["max_workers"] = max(args.max_workers or args.min_workers, args.min_workers)
    return ClusterShape(**given)


def names_of(manifests: Iterable[dict[str, Any]]) -> list[str]:
    return [m["metadata"]["name"] for m in manifests]


# The command line (`moe-cluster k8s ...`; cluster/cli/main.py adds the subparser and calls run_command)


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
