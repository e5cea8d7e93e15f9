"""The Serve application: `import_path: cluster.serve.app:build_app` with ServeOptions as `args`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.instance.resources import instance_bundles, resolve_device
from cluster.options.serve import APP_IMPORT_PATH, ServeOptions
from cluster.serve.autoscaling import POLICY_PATH
from cluster.serve.deployment import EngineDeployment
from cluster.serve.ingress import OpenAIIngress


def engine_deployment_options(options: ServeOptions) -> dict[str, Any]:
    """One replica = one model instance: the router in bundle 0, one bundle per expert shard."""
    gpu = resolve_device(options.device, options.expert_shards) == "cuda"
    bundles = instance_bundles(options.expert_shards, options.router_cpus, options.expert_cpus, gpu)
    return {
        "placement_group_bundles": bundles,
        "placement_group_strategy": options.placement_strategy,
        "ray_actor_options": {"num_cpus": bundles[0]["CPU"], "num_gpus": bundles[0].get("GPU", 0)},
        "autoscaling_config": options.engine_autoscaling.to_serve(POLICY_PATH),
        # Admission control is the engine's (KV budget, waiting-queue limit -> 429), not Serve's.
        "max_ongoing_requests": options.max_num_seqs + options.max_waiting + 1,
        "health_check_period_s": 5,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 60,
    }


def build_app(args: dict[str, Any]) -> Application:
    options = ServeOptions.model_validate(args or {})
    options.check_model_here()
    # `auto` is decided once, where the app is built, so that the bundles and the replicas agree.
    options.device = resolve_device(options.device, options.expert_shards)
    dumped = options.model_dump(mode="json")
    engine = EngineDeployment.options(**engine_deployment_options(options)).bind(dumped)
    ingress = options.ingress_autoscaling
    return OpenAIIngress.options(
        autoscaling_config=ingress.to_serve(),
        # The ingress only awaits the engine; it must admit more than its autoscaling target.
        max_ongoing_requests=max(256, int(4 * ingress.target_ongoing_requests)),
    ).bind(engine, dumped)


def serve_config(
    options: ServeOptions, host: str = "0.0.0.0", port: int = 8000, name: str = "moe-cluster"
) -> dict:
    """A Serve config file (what `serve deploy` and KubeRay's serveConfigV2 take) for these options."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": name,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": options.model_dump(mode="json", exclude_defaults=True),
            }
        ],
    }
