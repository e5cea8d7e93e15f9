"""What a model instance asks of its node: placement group bundles, devices, CPU threads, memory."""

from __future__ import annotations

import math
import os

import ray
import torch

from cluster.options.engine import Device, EngineConfig
from cluster.transport.group import TransportKind


def limit_threads(cpus: float) -> None:
    """One process never runs more compute threads than the CPUs Ray granted it."""
    torch.set_num_threads(max(1, int(cpus)))


def device_for(use_gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def resolve_device(device: Device, expert_shards: int) -> Device:
    """`auto` is cuda when the connected cluster has a GPU for the router and each expert shard."""
    if device != "auto":
        return device
    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    return "cuda" if gpus >= expert_shards + 1 else "cpu"


def transport_kind(config: EngineConfig) -> TransportKind:
    return "nccl" if config.use_gpu else config.transport


def gpu_cache_budget(utilization: float) -> int:
    """What the KV cache may take on this GPU once the weights are loaded: up to `utilization` of it."""
    free, total = torch.cuda.mem_get_info()
    budget = int(free - (1.0 - utilization) * total)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization}")
    return budget


def cores_are_dedicated(config: EngineConfig, node_id: str) -> bool:
    """Whether each of the instance's processes on node `node_id`, this process's, has a core of its own:
    each reserves at least one CPU, and Ray advertises no more CPUs there than this process may run on,
    so that no two reservations share a core."""
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    advertised = node["Resources"].get("CPU", 0.0) if node else math.inf
    return reservations_fit_cores(
        [config.router_cpus, config.expert_cpus], advertised, len(os.sched_getaffinity(0))
    )


def reservations_fit_cores(reserved_cpus: list[float], advertised_cpus: float, cores: int) -> bool:
    return min(reserved_cpus) >= 1 and advertised_cpus <= cores


def instance_bundles(expert_shards: int, router_cpus: float, expert_cpus: float, gpu: bool) -> list[dict]:
    """A model instance's placement group: bundle 0 for the router, then one per expert shard."""
    gpus = {"GPU": 1} if gpu else {}
    return [{"CPU": router_cpus, **gpus}] + [{"CPU": expert_cpus, **gpus} for _ in range(expert_shards)]


def config_bundles(config: EngineConfig) -> list[dict]:
    return instance_bundles(config.expert_shards, config.router_cpus, config.expert_cpus, config.use_gpu)


def ensure_ray(required_cpus: float = 1.0) -> bool:
    """Joins the cluster at RAY_ADDRESS, else starts a local one. Returns True if this call started Ray.

    A local cluster advertises at least the CPUs one engine needs, so that a small machine can still
    host a multi-shard demo (threads per actor are capped separately from this logical count).
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return False
    cpus = max(os.cpu_count() or 1, math.ceil(required_cpus))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True
