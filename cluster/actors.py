"""The Ray actors of one model instance: a RouterActor and its ExpertActors.

Ray only carries control calls here (load, join the group, whole generate requests); per-layer
tensors go over the collective group the actors form among themselves.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import torch
from ray.util import get_current_placement_group

from cluster.config import EngineConfig
from cluster.metrics import ExpertMetrics, attach_engine_metrics, model_instance_id
from cluster.router_host import Prompt, RouterHost, device_for, limit_threads, open_transport
from experts.checkpoint import CheckpointReader
from experts.placement import ExpertPlacement
from experts.shard import ExpertShard
from router.config import ModelConfig
from router.engine_core import InvalidRequest, TokenEvent
from router.exchange import ExchangeStats, run_expert_loop
from router.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str


@ray.remote
class ExpertActor:
    """Holds one shard's experts of every MoE layer; runs the SPMD loop the router drives."""

    def __init__(self, config: EngineConfig, shard: int) -> None:
        limit_threads(config.expert_cpus)
        self.config, self.shard_index = config, shard
        model = ModelConfig.from_model_dir(config.model_path)
        placement = ExpertPlacement(model.num_experts, config.expert_shards, config.placement)
        self.top_k = model.num_experts_per_tok
        self.dtype = config.torch_dtype
        shard_weights = ExpertShard.load(
            CheckpointReader(config.model_path), model.moe_layers, placement.experts_of(shard), self.dtype
        )
        self.shard = shard_weights.to(device_for(config.device == "cuda"))
        self.metrics = ExpertMetrics(model_instance_id(), shard) if config.metrics else None

    def info(self) -> dict:
        return {
            "shard": self.shard_index,
            "experts": self.shard.num_local_experts,
            "bytes": self.shard.nbytes(),
            "pid": os.getpid(),
        }

    def serve(self, rendezvous: str | tuple) -> int:
        """Joins the group and runs the SPMD loop until the router says STOP; returns steps served."""
        transport = open_transport(rendezvous, self.shard_index + 1, self.config)
        try:
            on_step = self.metrics.on_step if self.metrics else None
            return run_expert_loop(transport, self.shard, self.top_k, self.dtype, on_step)
        finally:
            transport.close()


async def _collect(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


async def _collect_or_error(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent] | str:
    try:
        return await _collect(stream)
    except InvalidRequest as err:
        return str(err)


@ray.remote
class RouterActor:
    """A model instance for Engine and batch jobs: whole requests in, completions out, batched."""

    def __init__(self, config: EngineConfig) -> None:
        self.host = RouterHost(config, get_current_placement_group())
        self.engine = self.host.engine_loop()
        attach_engine_metrics(self.engine, self.host, config.model_path.name)

    async def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Completion]:
        token_ids = [self.host.encode(p) for p in prompts]
        for ids, p in zip(token_ids, params, strict=True):
            self.host.core.validate(ids, p)
        streams = [self.engine.submit(ids, p) for ids, p in zip(token_ids, params, strict=True)]
        results = await asyncio.gather(*(_collect(stream) for stream in streams))
        completions = []
        for events in results:
            ids = [e.token_id for e in events]
            completions.append(Completion(ids, self.host.decode(ids), events[-1].finish_reason))
        return completions

    async def generate_each(
        self, prompts: list[Prompt | list[dict]], params: list[SamplingParams]
    ) -> list[dict]:
        """generate for batch jobs, where one bad request must not fail the others.

        A prompt may also be chat messages (a list of {"role", "content"} dicts, through the chat template).
        Per request: {"prompt_tokens", "token_ids", "text", "finish_reason"}, or {"error": message} for a
        request that cannot be served as given.
        """
        admitted = [self._admit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        streams = {
            i: self.engine.submit(ids, sp)
            for i, (ids, sp) in enumerate(zip(admitted, params, strict=True))
            if not isinstance(ids, str)
        }
        results = dict(
            zip(streams, await asyncio.gather(*map(_collect_or_error, streams.values())), strict=True)
        )
        out = []
        for i, ids in enumerate(admitted):
            events = results.get(i, ids)  # a request that was not admitted has its error in place of ids
            if isinstance(events, str):
                out.append({"error": events})
                continue
            tokens = [e.token_id for e in events]
            out.append(
                {
                    "prompt_tokens": len(ids),
                    "token_ids": tokens,
                    "text": self.host.decode(tokens),
                    "finish_reason": events[-1].finish_reason,
                }
            )
        return out

    def _admit(self, prompt: Prompt | list[dict], params: SamplingParams) -> list[int] | str:
        """The prompt's token ids, or why it cannot be served."""
        try:
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
                ids = self._chat_ids(prompt)
            else:
                ids = self.host.encode(prompt)
            self.host.core.validate(ids, params)
        except InvalidRequest as err:
            return str(err)
        return ids

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if self.host.tokenizer is None:
            raise InvalidRequest("this model has no tokenizer, so chat messages are not available")
        try:
            return self.host.tokenizer.apply_chat_template(messages)
        except Exception as err:  # the template's own checks (jinja errors) reject the conversation
            raise InvalidRequest(f"chat template failed: {err}") from None

    async def logits(self, prompt: Prompt) -> torch.Tensor:
        token_ids = self.host.encode(prompt)
        return await self.engine.run_in_loop(lambda core: core.prefill_logits(token_ids))

    def info(self) -> dict:
        return self.host.info()

    def stats(self, reset: bool = False) -> dict:
        """Step and exchange counters since start (or the last reset).

        step_seconds is the wall time of the model forwards; exchange_seconds the part of it spent in
        the routed-expert exchange (dispatch, expert compute, combine; not the overlapped shared expert).
        """
        core, exchange = self.host.core, self.host.core.experts.stats
        out = {
            "steps": core.steps,
            "step_seconds": core.step_seconds,
            "exchange_seconds": exchange.seconds,
            "rows_sent": exchange.rows_sent,
            "payload_bytes": exchange.payload_bytes,
            "meta_bytes": exchange.meta_bytes,
            "recoveries_s": list(self.engine.recoveries),
            "expert_restarts": self.host.expert_restarts,
        }
        if reset:
            core.steps, core.step_seconds = 0, 0.0
            core.experts.stats = ExchangeStats()
        return out

    def stop(self) -> None:
        self.engine.stop()
        self.host.shutdown()
