"""The Ray actors of one model instance: a RouterActor and its ExpertActors.

Ray only carries control calls here (load, connect, a whole generate request); per-layer tensors go
over the collective group the actors form among themselves.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
import torch

from cluster.config import EngineConfig
from experts.checkpoint import CheckpointReader
from experts.placement import ExpertPlacement
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.engine_core import EngineCore, InvalidRequest, default_cache_bytes
from router.exchange import CollectiveExperts, ExchangeStats, run_expert_loop
from router.kv_cache import KVCache
from router.sampling import SamplingParams
from router.scheduler import SchedulerConfig
from router.tokenizer import Tokenizer
from router.transport import ROUTER_RANK, Transport
from router.weights import load_router_model

Prompt = str | list[int]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str


def _limit_threads(cpus: float) -> None:
    """One process never runs more compute threads than the CPUs Ray granted it."""
    torch.set_num_threads(max(1, int(cpus)))


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def _open_transport(
    rendezvous: str | tuple, rank: int, world: int, config: EngineConfig, gpu: bool
) -> Transport:
    if gpu:
        from cluster.transport_nccl import NcclTransport

        return NcclTransport(rendezvous, rank, world)
    from cluster.transport_gloo import GlooTransport

    return GlooTransport(rendezvous, rank, world, config.collective_timeout_s)


@ray.remote
class ExpertActor:
    def __init__(self, config: EngineConfig, shard: int, use_gpu: bool) -> None:
        _limit_threads(config.expert_cpus)
        self.config, self.shard_index, self.use_gpu = config, shard, use_gpu
        model = ModelConfig.from_model_dir(config.model_path)
        placement = ExpertPlacement(model.num_experts, config.expert_shards, config.placement)
        self.top_k = model.num_experts_per_tok
        self.dtype = config.torch_dtype
        self.shard = ExpertShard.load(
            CheckpointReader(config.model_path), model.moe_layers, placement.experts_of(shard), self.dtype
        )
        if use_gpu:
            self.shard = self.shard.to(_device(True))

    def info(self) -> dict:
        return {
            "shard": self.shard_index,
            "experts": self.shard.num_local_experts,
            "bytes": self.shard.nbytes(),
            "pid": os.getpid(),
        }

    def serve(self, rendezvous: str | tuple, world_size: int) -> int:
        """Joins the group and runs the SPMD loop until the router says STOP; returns steps served."""
        transport = _open_transport(rendezvous, self.shard_index + 1, world_size, self.config, self.use_gpu)
        try:
            return run_expert_loop(transport, self.shard, self.top_k, self.dtype)
        finally:
            transport.close()


@ray.remote
class RouterActor:
    def __init__(self, config: EngineConfig, use_gpu: bool) -> None:
        _limit_threads(config.router_cpus)
        self.config, self.use_gpu = config, use_gpu
        self.device = _device(use_gpu)
        self.model_config = ModelConfig.from_model_dir(config.model_path)
        self.tokenizer = Tokenizer.from_model_dir(config.model_path) if _has_tokenizer(config) else None
        dtype = config.torch_dtype
        self.model = load_router_model(
            CheckpointReader(config.model_path), self.model_config, dtype, self.device
        )
        cache_bytes = config.kv_cache_bytes or default_cache_bytes(
            self.model_config, config.max_num_seqs, config.max_model_len, config.block_size, dtype
        )
        self.cache = KVCache(
            self.model_config, cache_bytes, config.max_num_seqs, config.block_size, dtype, self.device
        )
        self.placement = ExpertPlacement(
            self.model_config.num_experts, config.expert_shards, config.placement
        )
        self.core: EngineCore | None = None
        self.transport: Transport | None = None

    def rendezvous(self) -> str | tuple:
        if self.use_gpu:
            from cluster.transport_nccl import new_unique_id

            return new_unique_id()
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((host, 0))
            return f"{host}:{sock.getsockname()[1]}"

    def connect(self, rendezvous: str | tuple) -> None:
        self.transport = _open_transport(
            rendezvous, ROUTER_RANK, self.config.expert_shards + 1, self.config, self.use_gpu
        )
        experts = CollectiveExperts(self.transport, self.placement, self.model_config.num_experts_per_tok)
        eos = tuple(self.tokenizer.eos_token_ids) if self.tokenizer else self.model_config.eos_token_ids
        scheduler = SchedulerConfig(
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            self.config.max_model_len,
            self.config.max_waiting,
        )
        self.core = EngineCore(self.model_config, self.model, self.cache, experts, scheduler, eos)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"{self.config.model_path} has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequest("a token-id prompt must be a list of integers")
        return list(prompt)

    def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Completion]:
        token_ids = [self._encode(p) for p in prompts]
        seqs = self.core.generate(token_ids, params)
        return [
            Completion(
                s.output_ids, self.tokenizer.decode(s.output_ids) if self.tokenizer else None, s.finish_reason
            )
            for s in seqs
        ]

    def logits(self, prompt: Prompt) -> torch.Tensor:
        return self.core.prefill_logits(self._encode(prompt))

    def info(self) -> dict:
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "kv_cache_bytes": self.cache.nbytes,
            "vocab_size": self.model_config.vocab_size,
            "sequences": len(self.core.sequences) if self.core else 0,
        }

    def stats(self, reset: bool = False) -> dict:
        """Exchange and step counters accumulated since connect (or the last reset).

        step_seconds is the wall time of the model forwards; exchange_seconds is the part of it spent in
        the routed-expert exchange (dispatch, expert compute, combine; the overlapped shared expert not).
        """
        if self.core is None:
            return {}
        core, exchange = self.core, self.core.experts.stats
        out = {
            "steps": core.steps,
            "step_seconds": core.step_seconds,
            "exchange_seconds": exchange.seconds,
            "rows_sent": exchange.rows_sent,
            "payload_bytes": exchange.payload_bytes,
            "meta_bytes": exchange.meta_bytes,
        }
        if reset:
            core.steps, core.step_seconds = 0, 0.0
            core.experts.stats = ExchangeStats()
        return out

    def stop(self) -> None:
        """Ends the expert loops (STOP header) and closes the group."""
        if self.core is not None:
            self.core.experts.stop()
        if self.transport is not None:
            self.transport.close()
        self.core = self.transport = None


def _has_tokenizer(config: EngineConfig) -> bool:
    return (config.model_path / "tokenizer.json").is_file() or (
        config.model_path / "tokenizer_config.json"
    ).is_file()
