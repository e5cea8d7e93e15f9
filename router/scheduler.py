"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget. Running sequences that decode go first (one token each), then running
prefills take chunks of what is left, then waiting sequences are admitted while there is a free
sequence slot, budget and KV blocks for their first chunk. A long prompt is thus spread over several
steps instead of stalling the decodes beside it.

Blocks are taken as tokens are computed. When a running sequence needs a block and none is free, the
most recently admitted running sequence is preempted: its blocks go back to the pool and it waits at
the head of the queue, to be recomputed from its prompt and the tokens it already generated (the
prefix cache usually still holds most of them). The oldest sequence always makes progress, and no
request is admitted in a step that had to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.errors import QueueFull
from router.kv_cache import KVCache
from router.prefix_cache import extend_hashes
from router.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_waiting: int = 1024
    prefix_caching: bool = True


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    starts: list[int]
    lengths: list[int]
    samples: list[bool]  # the chunk reaches the sequence's last token, so a new token is sampled


@dataclass
class SchedulerStats:
    """Running totals for metrics and benchmarks."""

    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache (first admissions)
    prefix_hit_tokens: int = 0  # of those, found cached
    preemptions: int = 0
    max_running: int = 0  # most sequences running at once


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_active = 0  # running + waiting; changed only by add and finish, so safe to read anywhere
        self.stats = SchedulerStats()

    def has_room(self, incoming: int = 0) -> bool:
        """Room for one more request beside `incoming` ones not added yet.

        Requests beyond the free sequence slots wait, at most max_waiting of them.
        """
        return self.num_active + incoming < self.config.max_num_seqs + self.config.max_waiting

    def add(self, seq: Sequence) -> None:
        if not self.has_room():
            raise QueueFull(f"{self.config.max_num_seqs} sequences running and {len(self.waiting)} waiting")
        self.waiting.append(seq)
        self.num_active += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        step = ScheduledStep([], [], [], [])
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        preempted = False
        for seq in decoding + prefilling:
            budget = self._budget(step)
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this step
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.cache.can_grow(seq.blocks, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, step)
                preempted = True
                if victim is seq:
                    break
            else:
                self.cache.grow(seq.blocks, seq.num_computed + n)
                self._take(step, seq, n)
        while (
            not preempted
            and self.waiting
            and self._budget(step)
            and len(self.running) < self.config.max_num_seqs
        ):
            if not self._admit(self.waiting[0], step):
                break
            self.waiting.popleft()
        self.stats.max_running = max(self.stats.max_running, len(self.running))
        return step if step.seqs else None

    def _budget(self, step: ScheduledStep) -> int:
        return self.config.max_num_batched_tokens - sum(step.lengths)

    def _admit(self, seq: Sequence, step: ScheduledStep) -> bool:
        """Starts the waiting sequence if blocks for its first chunk are free (after its cached prefix)."""
        hit = 0
        if self.config.prefix_caching:
            self._hash(seq, seq.num_tokens)
            hit = self.cache.cached_prefix(seq.block_hashes, seq.num_tokens)
        blocks = self.cache.attach_prefix(seq.block_hashes, hit)
        n = min(seq.num_tokens - hit, self._budget(step))
        if not self.cache.can_grow(blocks, hit + n):
            self.cache.release(blocks)
            return False
        self.cache.grow(blocks, hit + n)
        if seq.cached_tokens is None:
            seq.cached_tokens = hit
            self.stats.prefix_query_tokens += len(seq.prompt_ids)
            self.stats.prefix_hit_tokens += hit
        seq.blocks, seq.num_computed, seq.status = blocks, hit, Status.RUNNING
        self.running.append(seq)
        self._take(step, seq, n)
        return True

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        if seq in step.seqs:
            i = step.seqs.index(seq)
            for column in (step.seqs, step.starts, step.lengths, step.samples):
                del column[i]
        self.running.remove(seq)
        self.cache.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.status = None, 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    @staticmethod
    def _take(step: ScheduledStep, seq: Sequence, n: int) -> None:
        step.seqs.append(seq)
        step.starts.append(seq.num_computed)
        step.lengths.append(n)
        step.samples.append(n == seq.num_tokens - seq.num_computed)

    def computed(self, step: ScheduledStep) -> None:
        """After the step's forward: its tokens are in the cache; full blocks join the prefix cache."""
        cache = self.cache
        for seq, n in zip(step.seqs, step.lengths, strict=True):
            seq.num_computed += n
            if self.config.prefix_caching:
                self._hash(seq, seq.num_computed)
                cache.register(seq.blocks, seq.block_hashes[: seq.num_computed // cache.block_size])
            cache.trim(seq.blocks, seq.num_computed)

    def _hash(self, seq: Sequence, num_tokens: int) -> None:
        """Extends the sequence's block hashes over its first num_tokens, hashing only new blocks."""
        size = self.cache.block_size
        done = len(seq.block_hashes) * size
        if num_tokens - done >= size:
            extend_hashes(self.cache.root, seq.token_slice(done, num_tokens), size, seq.block_hashes)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
            self.num_active -= 1
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.num_active -= 1
        if seq.blocks is not None:
            self.cache.release(seq.blocks)
            seq.blocks = None
