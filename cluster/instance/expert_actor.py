"""An expert actor: one shard's experts of every MoE layer, serving the router over the data plane.

Ray only carries control calls here (load, join the group, info); per-layer tensors go over the
data plane the router and its expert actors form among themselves (router/transport.py).
"""

from __future__ import annotations

import os

import ray

from cluster.instance.resources import device_for, limit_threads
from cluster.metrics.common import model_instance_id
from cluster.metrics.experts import ExpertMetrics
from cluster.options.engine import EngineConfig
from cluster.transport.group import Rendezvous, open_transport
from experts.checkpoint import CheckpointReader
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.expert_loop import run_expert_loop


@ray.remote
class ExpertActor:
    def __init__(self, config: EngineConfig, shard: int, experts: list[int]) -> None:
        """Loads `experts`, the logical expert of each of this shard's slots, in slot order."""
        limit_threads(config.expert_cpus)
        self.config, self.shard_index = config, shard
        model = ModelConfig.from_model_dir(config.model_path)
        self.top_k = model.num_experts_per_tok
        self.dtype = config.torch_dtype
        shard_weights = ExpertShard.load(
            CheckpointReader(config.model_path), model.moe_layers, experts, self.dtype
        )
        self.shard = shard_weights.to(device_for(config.use_gpu))
        self.metrics = ExpertMetrics(model_instance_id(), shard) if config.metrics else None

    def info(self) -> dict:
        return {
            "shard": self.shard_index,
            "experts": self.shard.num_local_experts,
            "bytes": self.shard.nbytes(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def run_expert_loop(self, rendezvous: Rendezvous) -> int:
        """Joins the group and serves the router until it says STOP; returns the dispatches served."""
        world = self.config.expert_shards + 1
        transport = open_transport(rendezvous, self.shard_index + 1, world, self.config.collective_timeout_s)
        try:
            on_dispatch = self.metrics.on_dispatch if self.metrics else None
            return run_expert_loop(transport, self.shard, self.top_k, self.dtype, on_dispatch)
        finally:
            transport.close()
