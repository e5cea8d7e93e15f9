"""A model instance brought up from inside its router process.

The router process sits in bundle 0 of a placement group (its RouterActor's, or the Serve replica's
own); it starts one ExpertActor per remaining bundle, forms the collective group with them, and
owns the EngineCore. RouterActor (Engine, batch jobs) and the Serve engine deployment both use it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.async_engine import AsyncEngine
from cluster.config import EngineConfig
from experts.checkpoint import CheckpointReader
from experts.placement import ExpertPlacement
from router.config import ModelConfig
from router.engine_core import EngineCore, InvalidRequest, default_cache_bytes
from router.exchange import CollectiveExperts
from router.kv_cache import KVCache
from router.scheduler import SchedulerConfig
from router.tokenizer import Tokenizer
from router.transport import ROUTER_RANK, Transport
from router.weights import load_router_model

Prompt = str | list[int]


def limit_threads(cpus: float) -> None:
    """One process never runs more compute threads than the CPUs Ray granted it."""
    torch.set_num_threads(max(1, int(cpus)))


def device_for(use_gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def open_transport(rendezvous: str | tuple, rank: int, config: EngineConfig) -> Transport:
    world = config.expert_shards + 1
    if config.device == "cuda":
        from cluster.transport_nccl import NcclTransport

        return NcclTransport(rendezvous, rank, world, config.collective_timeout_s)
    from cluster.transport_gloo import GlooTransport

    return GlooTransport(rendezvous, rank, world, config.collective_timeout_s)


def gpu_cache_budget(utilization: float) -> int:
    """What the KV cache may take on this GPU once the weights are loaded: up to `utilization` of it."""
    free, total = torch.cuda.mem_get_info()
    budget = int(free - (1.0 - utilization) * total)
    if budget <= 0:
        raise ValueError(f"no GPU memory left for the KV cache at gpu_memory_utilization={utilization}")
    return budget


def instance_bundles(expert_shards: int, router_cpus: float, expert_cpus: float, gpu: bool) -> list[dict]:
    """A model instance's placement group: bundle 0 for the router, then one per expert shard."""
    gpus = {"GPU": 1} if gpu else {}
    return [{"CPU": router_cpus, **gpus}] + [{"CPU": expert_cpus, **gpus} for _ in range(expert_shards)]


def config_bundles(config: EngineConfig) -> list[dict]:
    return instance_bundles(
        config.expert_shards, config.router_cpus, config.expert_cpus, config.device == "cuda"
    )


class RouterHost:
    def __init__(self, config: EngineConfig, pg: PlacementGroup, first_expert_bundle: int = 1) -> None:
        limit_threads(config.router_cpus)
        self.config = config
        self.device = device_for(config.device == "cuda")
        self.model_config = ModelConfig.from_model_dir(config.model_path)
        has_tokenizer = (config.model_path / "tokenizer.json").is_file()
        self.tokenizer = Tokenizer.from_model_dir(config.model_path) if has_tokenizer else None
        self._pg, self._first_expert_bundle = pg, first_expert_bundle
        self.generation = 0  # bumped each time the group is re-formed
        self.expert_restarts = 0
        self.experts = [self._spawn_expert(i) for i in range(config.expert_shards)]
        dtype = config.torch_dtype
        model = load_router_model(CheckpointReader(config.model_path), self.model_config, dtype, self.device)
        cache_bytes = config.kv_cache_bytes or (
            gpu_cache_budget(config.gpu_memory_utilization)
            if self.device.type == "cuda"
            else default_cache_bytes(
                self.model_config, config.max_num_seqs, config.max_model_len, config.block_size, dtype
            )
        )
        cache = KVCache(
            self.model_config, cache_bytes, config.max_num_seqs, config.block_size, dtype, self.device
        )
        ray.get([e.info.remote() for e in self.experts], timeout=config.ready_timeout_s)
        self.transport, self._serving = self._form_group()
        placement = ExpertPlacement(self.model_config.num_experts, config.expert_shards, config.placement)
        experts = CollectiveExperts(self.transport, placement, self.model_config.num_experts_per_tok)
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else self.model_config.eos_token_ids
        scheduler = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len, config.max_waiting
        )
        self.core = EngineCore(self.model_config, model, cache, experts, scheduler, eos)

    def engine_loop(self) -> AsyncEngine:
        """The continuous-batching loop over this instance, recovering through `rebuild`."""
        heartbeat = self.config.collective_timeout_s / 4
        return AsyncEngine(self.core, recover=self.rebuild, heartbeat_s=heartbeat)

    def _spawn_expert(self, shard: int) -> ray.actor.ActorHandle:
        from cluster.actors import ExpertActor

        bundle = config_bundles(self.config)[1 + shard]
        return ExpertActor.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, self._first_expert_bundle + shard),
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            max_concurrency=2,
        ).remote(self.config, shard)

    def rebuild(self) -> None:
        """Re-forms the expert group under a new generation after a transport failure.

        Expert actors whose loop ended with a transport error are reused; dead ones, and ones still
        stuck in the old group after a grace period, are replaced in their own bundle and reload their
        experts. The caller re-runs the interrupted step.
        """
        self.transport.close()
        grace = min(10.0, self.config.collective_timeout_s)
        ended, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=grace)
        for shard, ref in enumerate(self._serving):
            if ref in ended and self._ended_alive(ref):
                continue
            ray.kill(self.experts[shard])
            self.experts[shard] = self._spawn_expert(shard)
            self.expert_restarts += 1
        ray.get([e.info.remote() for e in self.experts], timeout=self.config.ready_timeout_s)
        self.transport, self._serving = self._form_group()
        self.core.experts.transport = self.transport
        self.generation += 1

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
        rendezvous = self._rendezvous()
        serving = [e.serve.remote(rendezvous) for e in self.experts]
        transport = open_transport(rendezvous, ROUTER_RANK, self.config)  # returns once every rank joined
        failed, _ = ray.wait(serving, timeout=0)
        if failed:
            ray.get(failed)  # an expert loop that ended at once raises its error here
        return transport, serving

    def _rendezvous(self) -> str | tuple:
        if self.config.device == "cuda":
            from cluster.transport_nccl import new_unique_id

            return new_unique_id()
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return f"{host}:{sock.getsockname()[1]}"

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"{self.config.model_path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequest("a token-id prompt must be a list of integers")
        return list(prompt)

    def decode(self, token_ids: Sequence[int]) -> str | None:
        return self.tokenizer.decode(list(token_ids)) if self.tokenizer else None

    def experts_alive(self) -> bool:
        """False once any expert loop has ended (its actor died, or the group broke)."""
        done, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=0)
        return not done

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "kv_cache_bytes": self.core.cache.nbytes,
            "vocab_size": self.model_config.vocab_size,
            "sequences": len(self.core.sequences),
            "experts": ray.get([e.info.remote() for e in self.experts]),
        }

    def shutdown(self) -> None:
        """Ends the expert loops with a STOP header, then removes the expert actors."""
        try:
            if self.experts_alive():
                self.core.experts.stop()
                ray.get(self._serving, timeout=30)
        except Exception:  # the actors are killed below either way
            pass
        self.transport.close()
        for actor in self.experts:
            ray.kill(actor)
