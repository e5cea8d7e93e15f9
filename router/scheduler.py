"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget. Running sequences that decode go first (one token each), then running
prefills take chunks of what is left, then waiting sequences are admitted while there is a free
sequence slot, budget and KV cache to reserve for them. A long prompt is thus spread over several
steps instead of stalling the decodes beside it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router.errors import QueueFull
from router.kv_cache import KVCache
from router.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    max_waiting: int = 1024


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    starts: list[int]
    lengths: list[int]
    samples: list[bool]  # the chunk reaches the sequence's last token, so a new token is sampled


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCache) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_active = 0  # running + waiting; changed only by add and finish, so safe to read anywhere

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
        budget = self.config.max_num_batched_tokens
        step = ScheduledStep([], [], [], [])
        decoding = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in decoding + prefilling:
            budget -= self._take(step, seq, budget)
            if budget == 0:
                break
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.cache.can_allocate(seq.max_len):
                break
            self.waiting.popleft()
            seq.blocks = self.cache.allocate(seq.max_len)
            seq.status = Status.RUNNING
            self.running.append(seq)
            budget -= self._take(step, seq, budget)
        return step if step.seqs else None

    @staticmethod
    def _take(step: ScheduledStep, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed
        n = min(remaining, budget)
        step.seqs.append(seq)
        step.starts.append(seq.num_computed)
        step.lengths.append(n)
        step.samples.append(n == remaining)
        return n

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
