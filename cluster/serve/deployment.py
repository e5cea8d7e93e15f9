"""The Serve engine deployment: each replica IS a router, with its expert actors in its placement group.

Serve gang-schedules a whole model instance per replica through `placement_group_bundles`
(bundle 0: this replica, bundles 1..N: its expert actors), so autoscaling adds or removes whole
model instances.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.util import get_current_placement_group

from cluster.errors import InvalidRequest, MaxTokensExceedContext
from cluster.instance.model_instance import ModelInstance
from cluster.options.serve import ServeOptions
from cluster.serve.messages import Accepted, GenerateRequest, JsonOutput, ModelInfo, TokenChunk, TokenLogprobs
from router.engine_core import TokenEvent
from router.grammar import Grammar, GrammarCompiler
from router.sampling import SamplingParams
from router.text_stream import TextStream


@serve.deployment(name="MoEEngine")
class EngineDeployment:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions.model_validate(options)
        self.instance = ModelInstance(self.options.engine_config(), get_current_placement_group())
        self.engine = self.instance.engine_loop()
        self.instance.attach_metrics(self.engine, self.options.model_name())
        self._grammars: GrammarCompiler | None = None

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.instance.core.max_model_len, self.instance.prompts.has_chat_template)

    def engine_config(self) -> dict[str, Any]:
        """The engine config this replica runs with (what the options round-trip test reads)."""
        return self.instance.config.model_dump(mode="json")

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Accepted | TokenChunk]:
        """First an Accepted once the request is admitted; then one TokenChunk per token.

        Errors before the first item (bad input, queue full) reach the caller as exceptions, so the
        HTTP layer can answer 4xx/429 before it starts a response. A request with `resume` continues
        one that a lost replica was serving.
        """
        resume = request.resume
        if resume:
            prompt_ids = list(resume.prompt_ids)
        else:
            prompt_ids = self.instance.prompts.encode(
                request.messages if request.messages is not None else request.prompt, request.tools
            )
        done = list(resume.output_ids) if resume else []
        fields = vars(request.sampling).copy()
        room = self.instance.core.max_model_len - len(prompt_ids)
        if fields["max_tokens"] is None:
            fields["max_tokens"] = max(1, room)
        elif fields["max_tokens"] > room > 0:
            raise MaxTokensExceedContext(
                f"max_tokens is {fields['max_tokens']} but the prompt has {len(prompt_ids)} tokens and "
                f"max_model_len is {self.instance.core.max_model_len}: at most {room} can be generated"
            )
        fields["max_tokens"] -= len(done)
        grammar = await self._grammar(request.json_output) if request.json_output else None
        params = SamplingParams(**fields, step_offset=len(done), grammar=grammar)
        events = self.engine.submit(prompt_ids + done, params)
        decode = self.instance.prompts.decode
        yield Accepted(len(prompt_ids), prompt_ids, (decode(prompt_ids) or "") if request.echo else None)
        text = TextStream(decode, request.stop, done, resume.sent_chars if resume else 0)
        try:
            async for event in events:
                delta = text.push(event.token_id)
                finish = "stop" if text.stopped else event.finish_reason
                if finish:
                    delta += text.finish()
                yield TokenChunk(delta, event.token_id, finish, self._logprobs(event), event.cached_tokens)
                if text.stopped:
                    return
        finally:
            await events.aclose()

    async def _grammar(self, output: JsonOutput) -> Grammar:
        """Compiled on a worker thread (a large schema takes long), once per schema and replica."""
        if self._grammars is None:
            tokenizer = self.instance.prompts.tokenizer
            if tokenizer is None:
                raise InvalidRequest("response_format needs the model's tokenizer, and this model has none")
            core = self.instance.core
            self._grammars = await asyncio.to_thread(
                GrammarCompiler, tokenizer.hf, core.config.vocab_size, sorted(core.eos_token_ids)
            )
        return await asyncio.to_thread(self._grammars.json, output.schema)

    def _logprobs(self, event: TokenEvent) -> TokenLogprobs | None:
        if event.logprob is None:
            return None
        decode = self.instance.prompts.decode
        top = [(decode([t]) or "", lp) for t, lp in event.top_logprobs or ()]
        return TokenLogprobs(decode([event.token_id]) or "", event.logprob, top)

    async def check_health(self) -> None:
        """Repairs a broken expert group in place; raises, so that Serve replaces the replica, if it can't."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop stopped: {self.engine.error!r}")
        if not self.instance.experts_alive():
            await self.engine.run_in_loop(lambda _: self.instance.experts_alive() or self.instance.rebuild())

    def recovery_stats(self) -> dict[str, Any]:
        """Expert-group recoveries so far: their durations (failure to next good step) and restarts."""
        return {
            "recoveries_s": list(self.engine.recoveries),
            "expert_restarts": self.instance.expert_restarts,
            "generation": self.instance.generation,
            "failovers": self.instance.failovers,
            "ranks_in_group": self.instance.ranks_in_group,
        }

    def ready(self) -> bool:
        return self.engine.alive and self.instance.experts_alive()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ongoing work for the autoscaler: running plus waiting sequences, not HTTP requests."""
        load = self.engine.load()
        return {"ongoing_sequences": float(load["running"] + load["waiting"])}

    def __del__(self) -> None:
        engine, instance = getattr(self, "engine", None), getattr(self, "instance", None)
        if engine is not None:
            engine.stop()
        if instance is not None:
            instance.shutdown()
