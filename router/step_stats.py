"""What one engine step did, for whoever reports it (cluster/metrics); the model keeps no timers.

`StepProfiler` adds the detail that costs a little per layer (router time in attention and in the
gates, (token, expert) pairs per MoE layer) through forward hooks on the model's PagedAttention
and MoEGate modules; the engine core installs it only when asked to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from router.exchange import ExchangeStats
from router.layers import MoEBlock, PagedAttention, RouterModel


@dataclass(frozen=True)
class StepStats:
    sequences: int
    tokens: int
    micro_batches: int
    forward_seconds: float  # wall time of the model forward(s)
    exchange: ExchangeStats
    attention_seconds: float = 0.0  # the rest only with a StepProfiler
    gate_seconds: float = 0.0
    expert_tokens: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [num_experts]


@dataclass
class StepTotals:
    """Sums over steps (RouterActor.stats, benchmarks); replaced to reset."""

    steps: int = 0
    split_steps: int = 0  # run as two micro-batches
    forward_seconds: float = 0.0
    exchange: ExchangeStats = field(default_factory=ExchangeStats)

    def add(self, step: StepStats) -> None:
        self.steps += 1
        self.split_steps += step.micro_batches > 1
        self.forward_seconds += step.forward_seconds
        self.exchange.add(step.exchange)


@dataclass(frozen=True)
class Occupancy:
    running: int
    waiting: int
    kv_usage: float
    full_blocks_used: int
    sliding_blocks_used: int
    prefix_query_tokens: int  # cumulative: prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # cumulative: of those, found cached
    preemptions: int  # cumulative


class StepProfiler:
    """Times every PagedAttention and MoEGate call and counts the gates' choices, until `take`."""

    def __init__(self, model: RouterModel) -> None:
        self.attention_seconds = self.gate_seconds = 0.0
        self.expert_tokens: dict[int, torch.Tensor] = {}
        self._num_experts = model.config.num_experts
        self._started = 0.0
        for module in model.modules():
            if isinstance(module, PagedAttention):
                module.register_forward_pre_hook(self._start)
                module.register_forward_hook(self._attention_done)
            elif isinstance(module, MoEBlock):
                module.gate_module.register_forward_pre_hook(self._start)
                module.gate_module.register_forward_hook(partial(self._gate_done, module.moe_index))

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._started = time.perf_counter()

    def _attention_done(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.attention_seconds += time.perf_counter() - self._started

    def _gate_done(
        self, moe_layer: int, module: nn.Module, args: tuple, out: tuple[torch.Tensor, ...]
    ) -> None:
        self.gate_seconds += time.perf_counter() - self._started
        counts = torch.bincount(out[0].reshape(-1), minlength=self._num_experts)
        total = self.expert_tokens.get(moe_layer)
        self.expert_tokens[moe_layer] = counts if total is None else total.add_(counts)

    def take(self) -> tuple[float, float, dict[int, torch.Tensor]]:
        out = self.attention_seconds, self.gate_seconds, self.expert_tokens
        self.attention_seconds = self.gate_seconds = 0.0
        self.expert_tokens = {}
        return out
