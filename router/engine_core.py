"""The router's engine loop: admit requests, run steps, sample, finish sequences."""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from experts.placement import ModelPlacement
from router.config import ModelConfig
from router.errors import ContextLengthExceeded, InvalidRequest
from router.exchange import RoutedExperts
from router.kv_cache import KVCache, SequenceBlocks, sliding_pool_blocks
from router.layers import RouterModel
from router.micro_batch import MIN_OVERLAP_TOKENS, MicroBatch, split_point
from router.sampling import SamplingParams, SamplingState, sample
from router.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from router.sequence import Sequence
from router.step_stats import Occupancy, StepProfiler, StepStats, StepTotals

TYPICAL_SEQUENCE_TOKENS = 4096  # what the default KV budget gives each of max_num_seqs sequences


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    finish_reason: str | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied for this request


class EngineCore:
    """Steps the model over the scheduler's batches; `last_step` and `totals` say what the steps did.

    `overlap`: split steps of at least `overlap_min_tokens` tokens and two or more sequences into two
    micro-batches (router/micro_batch.py). `profile`: also time attention and gates and count tokens
    per expert in the step stats (metrics).
    """

    def __init__(
        self,
        config: ModelConfig,
        model: RouterModel,
        cache: KVCache,
        experts: RoutedExperts,
        scheduler_config: SchedulerConfig,
        eos_token_ids: tuple[int, ...] = (),
        overlap: bool = False,
        overlap_min_tokens: int = MIN_OVERLAP_TOKENS,
        profile: bool = False,
    ) -> None:
        self.config = config
        self.model = model
        self.cache = cache
        self.experts = experts
        self.overlap = overlap  # may change between steps (the instance re-decides it with its group)
        self.overlap_min_tokens = overlap_min_tokens
        self.profiler = StepProfiler(model) if profile else None
        self.scheduler = Scheduler(scheduler_config, cache)
        self.max_model_len = min(scheduler_config.max_model_len, config.max_position_embeddings)
        self.eos_token_ids = frozenset(eos_token_ids or config.eos_token_ids)
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.totals = StepTotals()
        self.last_step: StepStats | None = None

    @property
    def placement(self) -> ModelPlacement:
        """The experts' placement now (online rebalancing replaces it between steps)."""
        return self.experts.placement

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty: at least one token is needed")
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        for name, ids in (
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("stop_token_ids", params.stop_token_ids),
        ):
            outside = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if outside:
                raise InvalidRequest(
                    f"{name}: token id {outside[0]} is outside the vocabulary [0, {self.config.vocab_size})"
                )
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len} "
                "and at least one token must be generated"
            )
        needed = self.cache.blocks_for(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if needed > self.cache.full.num_blocks:
            raise InvalidRequest(
                f"prompt + max_tokens needs {needed} KV blocks, the whole cache has "
                f"{self.cache.full.num_blocks}"
            )

    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        self.validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(
            request_id,
            list(prompt_ids),
            SamplingState.for_request(
                params, prompt_ids, self.config.vocab_size, self.eos_token_ids, self.cache.device
            ),
            max_len=min(len(prompt_ids) + params.max_tokens, self.max_model_len),
        )
        self.scheduler.add(seq)
        self.sequences[request_id] = seq
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def occupancy(self) -> Occupancy:
        scheduler, cache = self.scheduler, self.cache
        return Occupancy(
            len(scheduler.running),
            len(scheduler.waiting),
            cache.usage(),
            cache.full.num_used,
            cache.sliding.num_used,
            scheduler.stats.prefix_query_tokens,
            scheduler.stats.prefix_hit_tokens,
            scheduler.stats.preemptions,
        )

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        step = self.scheduler.schedule()
        if step is None:
            return []
        cut = split_point(step.lengths, self.overlap_min_tokens) if self.overlap else None
        ranges = [(0, len(step.seqs))] if cut is None else [(0, cut), (cut, len(step.seqs))]
        micro = [self._micro_batch(step, lo, hi) for lo, hi in ranges]
        self._forget_counters()
        started = time.perf_counter()
        # A step that fails (TransportError) wrote K/V only at positions it had not computed, in blocks
        # no other sequence shares, so the retry schedules the same tokens again over them.
        logits = torch.cat(self.model.forward_micro_batches(micro, self.cache, self.experts))
        self._record(step, len(micro), time.perf_counter() - started)
        self.scheduler.computed(step)
        sampled = [s for s, flag in zip(step.seqs, step.samples, strict=True) if flag]
        if not sampled:
            return []
        steps = [len(s.output_ids) + s.sampling.params.step_offset for s in sampled]
        new_ids = sample(logits, [s.sampling for s in sampled], steps)
        logprobs = self._logprobs(logits, new_ids, sampled)
        return [
            self._append(seq, token, *logprobs.get(i, (None, None)))
            for i, (seq, token) in enumerate(zip(sampled, new_ids.tolist(), strict=True))
        ]

    def _micro_batch(self, step: ScheduledStep, lo: int, hi: int) -> MicroBatch:
        """Sequences lo..hi of the step, with their own attention batch and logits rows."""
        tokens, logits_rows, offset = [], [], 0
        for i in range(lo, hi):
            seq, start, n = step.seqs[i], step.starts[i], step.lengths[i]
            tokens.extend(seq.token_slice(start, start + n))
            offset += n
            if step.samples[i]:
                logits_rows.append(offset - 1)
        device = self.cache.device
        batch = self.cache.build(
            step.starts[lo:hi], step.lengths[lo:hi], [s.blocks for s in step.seqs[lo:hi]]
        )
        return MicroBatch(
            torch.tensor(tokens, dtype=torch.int64, device=device),
            batch,
            torch.tensor(logits_rows, dtype=torch.int64, device=device),
        )

    def _forget_counters(self) -> None:
        """Drops what a failed step or prefill_logits left in the counters: not this step's work."""
        self.experts.take_stats()
        if self.profiler is not None:
            self.profiler.take()

    def _record(self, step: ScheduledStep, micro_batches: int, seconds: float) -> None:
        detail = self.profiler.take() if self.profiler is not None else (0.0, 0.0, {})
        self.last_step = StepStats(
            len(step.seqs), sum(step.lengths), micro_batches, seconds, self.experts.take_stats(), *detail
        )
        self.totals.add(self.last_step)

    @staticmethod
    def _logprobs(logits: torch.Tensor, new_ids: torch.Tensor, seqs: list[Sequence]) -> dict[int, tuple]:
        """Row -> (sampled token's logprob, top alternatives), for the rows that asked, in one pass."""
        rows = [i for i, s in enumerate(seqs) if s.sampling.params.logprobs is not None]
        if not rows:
            return {}
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits[index], dim=-1)
        chosen = logp.gather(1, new_ids[index][:, None])[:, 0].tolist()
        k = max(seqs[i].sampling.params.logprobs for i in rows)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        out = {}
        for j, i in enumerate(rows):
            n = seqs[i].sampling.params.logprobs
            pairs = zip(top_ids[j, :n].tolist(), top_values[j, :n].tolist(), strict=True)
            out[i] = (chosen[j], tuple(pairs))
        return out

    def _append(
        self, seq: Sequence, token: int, logprob: float | None, top: tuple[tuple[int, float], ...] | None
    ) -> TokenEvent:
        seq.output_ids.append(token)
        seq.sampling.observe(token)
        params = seq.sampling.params
        reason = None
        ends = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        if ends or seq.sampling.grammar_done:
            reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= seq.max_len:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)
            self.sequences.pop(seq.request_id, None)
        return TokenEvent(seq.request_id, token, reason, logprob, top, seq.cached_tokens or 0)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Sequence]:
        """Runs the given prompts to completion, batched; other queued work runs alongside."""
        for prompt, p in zip(prompts, params, strict=True):
            self.validate(prompt, p)
        ids = [self.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        seqs = [self.sequences[i] for i in ids]
        while any(s.finish_reason is None for s in seqs):
            self.step()
        return seqs

    @torch.inference_mode()
    def prefill_logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len, vocab] for every position of one prompt (parity checks); leaves no state."""
        self.validate(token_ids, SamplingParams(max_tokens=1))
        blocks = SequenceBlocks()
        chunk = self.scheduler.config.max_num_batched_tokens
        try:
            out = []
            for start in range(0, len(token_ids), chunk):
                piece = token_ids[start : start + chunk]
                if not self.cache.can_grow(blocks, start + len(piece)):
                    raise InvalidRequest("the KV cache has no room for this prompt right now")
                self.cache.grow(blocks, start + len(piece))
                batch = self.cache.build([start], [len(piece)], [blocks])
                rows = torch.arange(len(piece), device=self.cache.device)
                ids = torch.tensor(piece, dtype=torch.int64, device=self.cache.device)
                out.append(self.model(ids, batch, self.cache, self.experts, rows))
                self.cache.trim(blocks, start + len(piece))
            return torch.cat(out).cpu()
        finally:
            self.cache.release(blocks)


def default_cache_bytes(
    config: ModelConfig,
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    dtype: torch.dtype,
    max_num_batched_tokens: int = 2048,
) -> int:
    """Room for max_num_seqs sequences of up to TYPICAL_SEQUENCE_TOKENS each, and for one of max_model_len.

    Blocks are taken as tokens are computed, so the budget is sized for the sequences that usually run
    together, not for max_num_seqs of the longest possible; when longer ones fill it, the newest is
    preempted. The sliding pool is what max_num_seqs sequences need at once.
    """
    typical = min(max_model_len, TYPICAL_SEQUENCE_TOKENS)
    full_blocks = max(max_num_seqs * math.ceil(typical / block_size), math.ceil(max_model_len / block_size))
    sliding_blocks = sliding_pool_blocks(config, max_num_seqs, block_size, max_num_batched_tokens)
    return sum(
        (sliding_blocks if config.is_sliding(i) else full_blocks)
        * block_size
        * config.kv_bytes_per_token_layer(dtype.itemsize, i)
        for i in range(config.num_hidden_layers)
    )
