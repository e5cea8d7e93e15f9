"""The router actor that Engine and batch jobs drive: whole requests in, completions out, batched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
import torch
from ray.util import get_current_placement_group

from cluster.instance.model_instance import ModelInstance
from cluster.instance.prompts import Message, Prompt
from cluster.options.engine import EngineConfig
from router.engine_core import TokenEvent
from router.errors import InvalidRequest
from router.sampling import SamplingParams
from router.step_stats import StepTotals


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str


async def _collect(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent]:
    return [event async for event in stream]


async def _collect_or_error(stream: AsyncIterator[TokenEvent]) -> list[TokenEvent] | str:
    try:
        return await _collect(stream)
    except InvalidRequest as err:
        return str(err)


@ray.remote
class RouterActor:
    def __init__(self, config: EngineConfig) -> None:
        self.instance = ModelInstance(config, get_current_placement_group())
        self.engine = self.instance.engine_loop()
        self.instance.attach_metrics(self.engine, config.model_path.name)

    async def generate(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Completion]:
        token_ids = [self.instance.prompts.encode(p) for p in prompts]
        for ids, p in zip(token_ids, params, strict=True):
            self.instance.core.validate(ids, p)
        streams = [self.engine.submit(ids, p) for ids, p in zip(token_ids, params, strict=True)]
        results = await asyncio.gather(*(_collect(stream) for stream in streams))
        completions = []
        for events in results:
            ids = [e.token_id for e in events]
            completions.append(Completion(ids, self.instance.prompts.decode(ids), events[-1].finish_reason))
        return completions

    async def generate_each(
        self, prompts: list[Prompt | list[Message]], params: list[SamplingParams]
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
                    "text": self.instance.prompts.decode(tokens),
                    "finish_reason": events[-1].finish_reason,
                }
            )
        return out

    def _admit(self, prompt: Prompt | list[Message], params: SamplingParams) -> list[int] | str:
        """The prompt's token ids, or why it cannot be served."""
        try:
            ids = self.instance.prompts.encode(prompt)
            self.instance.core.validate(ids, params)
        except InvalidRequest as err:
            return str(err)
        return ids

    async def logits(self, prompt: Prompt) -> torch.Tensor:
        token_ids = self.instance.prompts.encode(prompt)
        return await self.engine.run_in_loop(lambda core: core.prefill_logits(token_ids))

    def info(self) -> dict:
        return self.instance.info()

    def config(self) -> dict:
        """The engine config this instance runs with (what the options round-trip test reads)."""
        return self.instance.config.model_dump(mode="json")

    def stats(self, reset: bool = False) -> dict:
        """Step and exchange counters since start (or the last reset).

        step_seconds is the wall time of the model forwards; exchange_seconds the part of it the router
        spent waiting for expert ranks' answers (what its own work, micro-batches included, did not cover).
        """
        core = self.instance.core
        totals, exchange = core.totals, core.totals.exchange
        out = {
            "steps": totals.steps,
            "split_steps": totals.split_steps,
            "step_seconds": totals.forward_seconds,
            "exchange_seconds": exchange.wait_seconds,
            "messages": exchange.messages,
            "rows_sent": exchange.rows_sent,
            "payload_bytes": exchange.payload_bytes,
            "meta_bytes": exchange.meta_bytes,
            "rank_pairs": list(exchange.rank_pairs),  # (token, expert) pairs per expert rank
            "recoveries_s": list(self.engine.recoveries),
            "expert_restarts": self.instance.expert_restarts,
            "failovers": self.instance.failovers,
            "ranks_in_group": self.instance.ranks_in_group,
            **vars(core.scheduler.stats),  # prefix-cache tokens, preemptions, most sequences at once
        }
        if reset:
            core.totals = StepTotals()
        return out

    async def expert_counters(self) -> list[dict]:
        """Each expert actor's counters (ExpertActor.counters), in shard order; they are not reset."""
        return list(await asyncio.gather(*(actor.counters.remote() for actor in self.instance.experts)))

    def stop(self) -> None:
        self.engine.stop()
        self.instance.shutdown()
