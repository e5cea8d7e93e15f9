"""An expert actor: one shard's experts of every MoE layer, serving the router over the data plane.

Ray only carries control calls here (load, join the group, info); per-layer tensors go over the
data plane the router and its expert actors form among themselves (router/transport.py).
"""

from __future__ import annotations

import os
import threading

import ray

from cluster.instance.resources import device_for, limit_threads
from cluster.metrics.common import model_instance_id
from cluster.metrics.experts import ExpertMetrics
from cluster.options.engine import EngineConfig
from cluster.transport.group import Rendezvous, open_transport
from experts.checkpoint import CheckpointReader
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.expert_loop import ExpertStats, run_expert_loop
from router.weights import expert_kind


@ray.remote
class ExpertActor:
    """`slots`: per MoE layer, the logical expert of each of this shard's slots, in slot order, of the
    placement with version `version` (0 at start, bumped by each rebalance)."""

    def __init__(self, config: EngineConfig, shard: int, slots: list[list[int]], version: int = 0) -> None:
        limit_threads(config.expert_cpus)
        self.config, self.shard_index = config, shard
        model = ModelConfig.from_model_dir(config.model_path)
        self.top_k = model.num_experts_per_tok
        self.dtype = config.torch_dtype
        self.moe_layers = model.moe_layers
        self.device = device_for(config.use_gpu)
        shard_weights = ExpertShard.load(
            CheckpointReader(config.model_path), model.moe_layers, slots, self.dtype, expert_kind(model)
        )
        self.shard = shard_weights.to(self.device)
        # placement version -> (its slots, their weights): the live one, and one prepared or just left
        self._versions = {version: (slots, self.shard)}
        self.version = version
        self._lock = threading.Lock()
        self.metrics = ExpertMetrics(model_instance_id(), shard) if config.metrics else None
        self.served = ExpertStats()  # over every loop this actor ran

    def info(self) -> dict:
        return {
            "shard": self.shard_index,
            "experts": self.shard.num_local_experts,
            "slots": self._versions[self.version][0],
            "version": self.version,
            "bytes": self.shard.nbytes(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def counters(self) -> dict:
        """What this actor's loops served so far: dispatches, rows, seconds in the expert forward."""
        return vars(self.served).copy()

    def prepare(self, version: int, slots: list[list[int]]) -> int:
        """Builds the slots of placement `version` beside the live ones, while the loop serves with
        those; returns the bytes read from the checkpoint (experts this shard did not hold)."""
        with self._lock:
            held, live = self._versions[self.version]
            self._versions = {self.version: (held, live)}
        reader = CheckpointReader(self.config.model_path)
        shard, moved = live.reslot(reader, self.moe_layers, held, slots)
        with self._lock:
            self._versions[version] = (slots, shard)
        return moved

    def _use(self, version: int) -> ExpertShard:
        """The loop's SWITCH (and a rejoin): the version left stays until the next prepare or join."""
        with self._lock:
            if version not in self._versions:
                raise RuntimeError(f"shard {self.shard_index} has no slots prepared for version {version}")
            self.version, self.shard = version, self._versions[version][1]
            return self.shard

    def run_expert_loop(self, rendezvous: Rendezvous, version: int = 0) -> int:
        """Joins the group and serves the router until it says STOP; returns the dispatches served.

        `version`: the placement the router dispatches with (a rebalance it had not finished is dropped).
        """
        shard = self._use(version)
        with self._lock:
            self._versions = {version: self._versions[version]}
        world = self.config.expert_shards + 1
        transport = open_transport(rendezvous, self.shard_index + 1, world, self.config.collective_timeout_s)
        try:
            on_dispatch = self.metrics.on_dispatch if self.metrics else None
            return run_expert_loop(
                transport, shard, self.top_k, self.dtype, on_dispatch, self._use, self.served
            )
        finally:
            transport.close()
