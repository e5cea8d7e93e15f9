"""The Serve engine deployment: each replica IS a router, with its expert actors in its placement group.

Serve gang-schedules a whole model instance per replica through `placement_group_bundles`
(bundle 0: this replica, bundles 1..N: its expert actors), so autoscaling adds or removes whole
model instances.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.util import get_current_placement_group

from cluster.metrics import attach_engine_metrics
from cluster.router_host import RouterHost
from cluster.serve_options import ServeOptions
from router.engine_core import InvalidRequest, TokenEvent
from router.sampling import SamplingParams
from router.text_stream import TextStream


@serve.deployment(name="MoEEngine")
class EngineServer:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions.model_validate(options)
        self.host = RouterHost(self.options.engine_config(), get_current_placement_group())
        self.engine = self.host.engine_loop()
        attach_engine_metrics(self.engine, self.host, self.options.model_name())

    def model_info(self) -> dict[str, Any]:
        return {
            "max_model_len": self.host.core.max_model_len,
            "has_chat_template": bool(self.host.tokenizer and self.host.tokenizer.has_chat_template),
        }

    def _prompt_ids(self, request: dict[str, Any]) -> list[int]:
        if "messages" in request:
            if self.host.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer, so chat completions are not available")
            return self.host.tokenizer.apply_chat_template(request["messages"])
        return self.host.encode(request["prompt"])

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """First item {"prompt_tokens", "prompt_ids"} once the request is accepted; then one per token.

        Errors before the first item (bad input, queue full) reach the caller as exceptions, so the
        HTTP layer can answer 4xx/429 before it starts a response. A request carrying
        `resume: {"prompt_ids", "output_ids", "sent"}` continues one that a lost replica was serving.
        """
        resume = request.get("resume")
        prompt_ids = list(resume["prompt_ids"]) if resume else self._prompt_ids(request)
        done = list(resume["output_ids"]) if resume else []
        fields = dict(request["params"])
        if fields.get("max_tokens") is None:
            fields["max_tokens"] = max(1, self.host.core.max_model_len - len(prompt_ids))
        fields["max_tokens"] -= len(done)
        params = SamplingParams(**fields, step_offset=len(done))
        events = self.engine.submit(prompt_ids + done, params)
        yield {"prompt_tokens": len(prompt_ids), "prompt_ids": prompt_ids}
        text = TextStream(self.host.decode, request.get("stop") or (), done, resume["sent"] if resume else 0)
        try:
            async for event in events:
                delta = text.push(event.token_id)
                finish = "stop" if text.stopped else event.finish_reason
                if finish:
                    delta += text.finish()
                yield {
                    "text": delta,
                    "token_id": event.token_id,
                    "finish_reason": finish,
                    **self._logprobs(event),
                }
                if text.stopped:
                    return
        finally:
            await events.aclose()

    def _logprobs(self, event: TokenEvent) -> dict[str, Any]:
        if event.logprob is None:
            return {}
        token = self.host.decode([event.token_id]) or ""
        top = [(self.host.decode([t]) or "", lp) for t, lp in event.top_logprobs or ()]
        return {"token": token, "logprob": event.logprob, "top_logprobs": top}

    async def check_health(self) -> None:
        """Repairs a broken expert group in place; raises, so that Serve replaces the replica, if it can't."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop stopped: {self.engine.error!r}")
        if not self.host.experts_alive():
            await self.engine.run_in_loop(lambda _: self.host.experts_alive() or self.host.rebuild())

    def recovery_stats(self) -> dict[str, Any]:
        """Expert-group recoveries so far: their durations (failure to next good step) and restarts."""
        return {
            "recoveries_s": list(self.engine.recoveries),
            "expert_restarts": self.host.expert_restarts,
            "generation": self.host.generation,
        }

    def ready(self) -> bool:
        return self.engine.alive and self.host.experts_alive()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ongoing work for the autoscaler: running plus waiting sequences, not HTTP requests."""
        load = self.engine.load()
        return {"ongoing_sequences": float(load["running"] + load["waiting"])}

    def __del__(self) -> None:
        engine, host = getattr(self, "engine", None), getattr(self, "host", None)
        if engine is not None:
            engine.stop()
        if host is not None:
            host.shutdown()
