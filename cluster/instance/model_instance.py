"""A model instance brought up from inside its router process, and recovered when its group breaks.

The router process sits in bundle 0 of a placement group (its RouterActor's, or the Serve replica's
own); it starts one ExpertActor per remaining bundle, forms the collective group with them, and
owns the EngineCore. RouterActor (Engine, batch jobs) and the Serve engine deployment both use it.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.instance.engine_loop import EngineLoop
from cluster.instance.expert_actor import ExpertActor
from cluster.instance.prompts import PromptEncoder
from cluster.instance.rebalancer import Rebalancer
from cluster.instance.resources import (
    config_bundles,
    cores_are_dedicated,
    device_for,
    gpu_cache_budget,
    limit_threads,
    transport_kind,
)
from cluster.metrics.common import model_instance_id
from cluster.metrics.engine import EngineMetrics, ExpertGroupState
from cluster.options.engine import EngineConfig
from cluster.transport.group import new_rendezvous, open_transport
from cluster.transport.per_peer import carrier
from experts.checkpoint import CheckpointReader
from experts.placement import ModelPlacement
from router.config import ModelConfig
from router.engine_core import EngineCore, default_cache_bytes
from router.errors import TransportError
from router.exchange import TransportExperts
from router.kv_cache import KVCache
from router.scheduler import SchedulerConfig
from router.transport import ROUTER_RANK, Transport
from router.weights import load_router_model

MAX_REPLACEMENTS = 3  # tries to re-form the group when a replacement expert dies as it starts
DEATH_CONFIRM_S = 2.0  # how long a failover waits for Ray to confirm that the failed rank's actor died
log = logging.getLogger(__name__)


class ModelInstance:
    def __init__(self, config: EngineConfig, pg: PlacementGroup, first_expert_bundle: int = 1) -> None:
        limit_threads(config.router_cpus)
        self.config = config
        self.device = device_for(config.use_gpu)
        self.model_config = ModelConfig.from_model_dir(config.model_path)
        self.prompts = PromptEncoder(config.model_path)
        self._pg, self._first_expert_bundle = pg, first_expert_bundle
        self.generation = 0  # bumped each time the group is re-formed
        self.expert_restarts = 0
        self.failovers = 0  # expert-rank losses served on, at once, by the other ranks' replicas
        self._joining: dict[int, ray.ObjectRef] = {}  # shard -> its replacement's `info`, while it loads
        self._routed_before: ModelPlacement | None = None  # the full placement, while ranks are out
        placement = ModelPlacement.uniform(
            len(self.model_config.moe_layers),
            self.model_config.num_experts,
            config.expert_shards,
            config.placement,
            config.redundant_experts,
        )
        self.experts = [self._spawn_expert(i, placement) for i in range(config.expert_shards)]
        dtype = config.torch_dtype
        max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        model = load_router_model(CheckpointReader(config.model_path), self.model_config, dtype, self.device)
        cache_bytes = config.kv_cache_bytes or (
            gpu_cache_budget(config.gpu_memory_utilization)
            if self.device.type == "cuda"
            else default_cache_bytes(
                self.model_config,
                config.max_num_seqs,
                max_model_len,
                config.block_size,
                dtype,
                config.max_num_batched_tokens,
            )
        )
        cache = KVCache(
            self.model_config,
            cache_bytes,
            config.max_num_seqs,
            config.block_size,
            dtype,
            self.device,
            config.max_num_batched_tokens,
        )
        self.transport, self._serving = self._form_group()
        experts = TransportExperts(
            self.transport,
            placement,
            self.model_config.num_experts_per_tok,
            keepalive_s=config.collective_timeout_s / 4,
        )
        tokenizer = self.prompts.tokenizer
        eos = tuple(tokenizer.eos_token_ids) if tokenizer else self.model_config.eos_token_ids
        scheduler = SchedulerConfig(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_model_len,
            config.max_waiting,
            config.prefix_caching,
        )
        self.core = EngineCore(
            self.model_config,
            model,
            cache,
            experts,
            scheduler,
            eos,
            overlap=self._overlap(),
            profile=config.metrics,
        )
        self.rebalancer = (
            Rebalancer(
                lambda: self.core.experts, lambda: self.experts, config.eplb_interval_s, config.eplb_window_s
            )
            if config.eplb and config.redundant_experts > 0
            else None
        )

    def engine_loop(self) -> EngineLoop:
        """The continuous-batching loop over this instance, recovering through `recover`."""
        heartbeat = self.config.collective_timeout_s / 4
        return EngineLoop(
            self.core, recover=self.recover, heartbeat_s=heartbeat, between_steps=self.between_steps
        )

    def attach_metrics(self, engine: EngineLoop, model: str) -> None:
        """Makes the engine loop export its metrics, unless the config turned them off."""
        if self.config.metrics:
            engine.metrics = EngineMetrics(
                self.core,
                model,
                model_instance_id(),
                self.experts_alive,
                lambda: self.expert_restarts,
                self.config.expert_layer_metrics,
                group_state=self.group_state,
            )

    @property
    def placement(self) -> ModelPlacement:
        """The full placement: the one the router dispatches by, or did before a failover."""
        return self._routed_before or self.core.experts.placement

    def _spawn_expert(self, shard: int, placement: ModelPlacement | None = None) -> ray.actor.ActorHandle:
        """With `placement`'s slots (at start), by default the full placement's (a replacement)."""
        placement = placement or self.placement
        bundle = config_bundles(self.config)[1 + shard]
        return ExpertActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, self._first_expert_bundle + shard),
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            max_concurrency=2,
        ).remote(self.config, shard, placement.slots_of(shard), self._version())

    def recover(self, err: TransportError) -> None:
        """After a failed step: go on at once without the dead expert ranks when every expert has a
        replica on a live one (`_fail_over`), else re-form the whole group (`rebuild`)."""
        if not self._fail_over(err):
            self.rebuild()

    def _fail_over(self, err: TransportError) -> bool:
        """Serves on with the live ranks' replicas while replacements for the dead ranks load.

        Only for a rank whose actor is confirmed dead (a stalled one takes `rebuild`, which waits out
        its grace period), and not over NCCL, whose communicator does not outlive a member.
        """
        if err.rank is None or self._joining or transport_kind(self.config) == "nccl":
            return False
        if self.placement.without_ranks({err.rank - 1}) is None:
            return False  # its experts have no other replica: nothing to fail over to
        first = self._serving[err.rank - 1]
        ready, _ = ray.wait([first], timeout=DEATH_CONFIRM_S)
        if not ready or self._ended_alive(first):
            return False
        ended, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=0)
        dead = {s for s, ref in enumerate(self._serving) if ref in ended and not self._ended_alive(ref)}
        placement = self.placement.without_ranks(dead)
        if placement is None:
            return False
        full = self.placement
        try:
            self.core.experts.fail_over(placement, absent={s + 1 for s in dead})
        except TransportError:
            return False
        self._routed_before = full
        if self.rebalancer is not None:
            self.rebalancer.cancel()  # a rebalance being prepared counted on the lost rank
        for shard in sorted(dead):
            ray.kill(self.experts[shard])
            self.experts[shard] = self._spawn_expert(shard)
            self._joining[shard] = self.experts[shard].info.remote()
            self.expert_restarts += 1
        self.failovers += 1
        log.warning("expert shards %s lost: serving on their replicas while they reload", sorted(dead))
        return True

    def between_steps(self) -> bool:
        """The engine loop's hook: a rejoin while ranks are out of the group, else the rebalancer.
        True while a replacement is still loading (the loop then calls again soon)."""
        if self._joining:
            return self._rejoin_loaded()
        if self.rebalancer is not None:
            self.rebalancer.tick()
        return False

    def _rejoin_loaded(self) -> bool:
        """Once every replacement has loaded, re-forms the full group with them (the other ranks only
        rejoin, nothing reloads); True while some are still loading."""
        refs = list(self._joining.values())
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        if len(ready) < len(refs):
            return True
        try:
            ray.get(refs)
        except ray.exceptions.RayActorError:
            self._joining = {}  # one died as it loaded: the rebuild replaces it as any lost actor
        self.rebuild()
        return False

    @property
    def ranks_in_group(self) -> int:
        """Expert ranks the router routes to now (fewer than expert_shards after a failover)."""
        return self.config.expert_shards - len(self.core.experts.absent)

    def rebuild(self) -> None:
        """Re-forms the expert group under a new generation after a transport failure.

        Expert actors whose loop ended with a transport error are reused; dead ones, and ones still
        stuck in the old group after a grace period, are replaced in their own bundle and reload their
        experts. When a whole node is lost, a replacement may first be sent to that node before Ray
        declares it dead and moves its bundle; that replacement dies, and is replaced again. The caller
        re-runs the interrupted step.
        """
        self.core.experts.release()
        self.transport.close()
        if self.rebalancer is not None:
            self.rebalancer.cancel()
        for attempt in range(1, MAX_REPLACEMENTS + 1):
            self._replace_lost_experts()
            try:
                self.transport, self._serving = self._form_group()
                break
            except ray.exceptions.RayActorError:
                if attempt == MAX_REPLACEMENTS:
                    raise
        self.core.experts.reconnect(self.transport, self.placement)
        self.core.overlap = self._overlap()  # the ranks may have moved
        self._joining, self._routed_before = {}, None
        self.generation += 1

    def _replace_lost_experts(self) -> None:
        """Replaces the actors whose loop died (or is stuck), except replacements already spawned."""
        grace = min(10.0, self.config.collective_timeout_s)
        ended, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=grace)
        for shard, ref in enumerate(self._serving):
            if shard in self._joining or (ref in ended and self._ended_alive(ref)):
                continue
            ray.kill(self.experts[shard])
            self.experts[shard] = self._spawn_expert(shard)
            self.expert_restarts += 1

    @staticmethod
    def _ended_alive(ref: ray.ObjectRef) -> bool:
        """An expert loop that returned or raised by itself; False if its actor died."""
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            return False
        except ray.exceptions.RayTaskError:
            return True
        return True

    def _form_group(self) -> tuple[Transport, list[ray.ObjectRef]]:
        infos = ray.get([e.info.remote() for e in self.experts], timeout=self.config.ready_timeout_s)
        nodes = [ray.get_runtime_context().get_node_id()] + [info["node_id"] for info in infos]
        dedicated = cores_are_dedicated(self.config, nodes[ROUTER_RANK])
        rendezvous = self.rendezvous = new_rendezvous(transport_kind(self.config), nodes, dedicated)
        serving = [e.run_expert_loop.remote(rendezvous, self._version()) for e in self.experts]
        world = self.config.expert_shards + 1
        # returns once every rank joined
        transport = open_transport(rendezvous, ROUTER_RANK, world, self.config.collective_timeout_s)
        failed, _ = ray.wait(serving, timeout=0)
        if failed:
            ray.get(failed)  # an expert loop that ended at once raises its error here
        return transport, serving

    def _overlap(self) -> bool:
        """The `overlap` option; unset, on when every expert rank shares memory with the router (where
        two-batch overlap measured faster), off when any is reached over gloo or NCCL."""
        if self.config.overlap is not None:
            return self.config.overlap
        return len(self.rendezvous.shm_ranks) == self.config.expert_shards + 1

    def _version(self) -> int:
        """The placement version the router dispatches with (0 until the first rebalance)."""
        core = getattr(self, "core", None)
        return core.experts.version if core is not None else 0

    def group_state(self) -> ExpertGroupState:
        """The expert ranks serving now, and the (MoE layer, logical expert) pairs a lost rank left with
        one copy or none (of those the full placement gives more), for the metrics."""
        ended, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=0)
        dead = {shard for shard, ref in enumerate(self._serving) if ref in ended}
        exposed = 0
        if dead:
            lost_rank = torch.zeros(self.config.expert_shards, dtype=torch.bool)
            lost_rank[sorted(dead)] = True
            for layer in self.placement.layers:
                real = torch.arange(layer.replica_shard.shape[1]) < layer.replica_count[:, None]
                lost = (lost_rank[layer.replica_shard] & real).sum(1)
                exposed += int(((lost > 0) & (layer.replica_count - lost <= 1)).sum())
        eplb = self.rebalancer
        last = eplb.done[-1] if eplb is not None and eplb.done else None
        return ExpertGroupState(
            ranks_in_group=self.config.expert_shards - len(dead),
            experts_without_replica=exposed,
            failovers=self.failovers,
            rebalances=len(eplb.done) if eplb is not None else 0,
            rebalance_bytes=eplb.bytes_moved if eplb is not None else 0,
            last_rebalance=(last.before, last.after) if last is not None else None,
        )

    def experts_alive(self) -> bool:
        """False once an expert loop of the group in use has ended (its actor died, or the group broke).
        A rank out of the group since a failover, its replacement still loading, does not count."""
        serving = [ref for shard, ref in enumerate(self._serving) if shard not in self._joining]
        done, _ = ray.wait(serving, num_returns=len(serving), timeout=0)
        return not done

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "kv_cache_bytes": self.core.cache.nbytes,
            "vocab_size": self.model_config.vocab_size,
            "sequences": len(self.core.sequences),
            "experts": ray.get([e.info.remote() for e in self.experts]),
            # rank -> the transport class between the router and that expert rank (shm, gloo, nccl)
            "transports": {
                rank: type(carrier(self.transport, rank)).__name__
                for rank in range(1, self.config.expert_shards + 1)
            },
            "eplb": self.rebalancer.info() if self.rebalancer is not None else None,
            "dedicated_cores": self.rendezvous.dedicated_cores,  # its shared-memory waits spin longer
        }

    def shutdown(self) -> None:
        """Ends the expert loops with a STOP message, then removes the expert actors."""
        try:
            if self.experts_alive():
                self.core.experts.stop()
                ray.get(self._serving, timeout=30)
        except Exception:  # the actors are killed below either way
            pass
        self.transport.close()
        for actor in self.experts:
            ray.kill(actor)
