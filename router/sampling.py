"""Greedy and stochastic sampling for a whole batch in one pass.

Randomness comes from a counter-based hash of (request seed, output position, token id) rather than
a shared generator, so a seeded request draws the same tokens whatever else is in its batch, and
no per-request generator forces a loop over rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from router.grammar import Grammar, TokenMatcher
from router.logits_processors import process_logits

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    step_offset: int = 0  # tokens generated before a resumption, so seeded draws continue where they were
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers' / vLLM's: over prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # end and stop tokens are masked until this many tokens are generated
    grammar: Grammar | None = None  # the output must match it (structured outputs)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 1 << 31:
            raise ValueError(f"top_k must be within 0..2**31-1, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be within 0..20, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be within -2..2, got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be within -100..100")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be within 0..max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass
class SamplingState:
    """Per-sequence inputs of the sampler; `seed` is fixed when the request arrives.

    The tensors exist only for the requests that need them: `counts` (output tokens, [vocab]) and
    `prompt_mask` (tokens of the prompt) for penalties, `suppress_ids` (end and stop tokens) for
    min_tokens, `bias_ids`/`bias_values` for logit_bias.
    """

    params: SamplingParams
    seed: int = field(default=0)
    counts: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    suppress_ids: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    matcher: TokenMatcher | None = None

    @property
    def grammar_done(self) -> bool:
        return self.matcher is not None and self.matcher.done

    @classmethod
    def for_request(
        cls,
        params: SamplingParams,
        prompt_ids: Sequence[int] = (),
        vocab: int = 0,
        eos_token_ids: Iterable[int] = (),
        device: torch.device | str = "cpu",
    ) -> SamplingState:
        """prompt_ids' last `params.step_offset` tokens are output of the request being resumed."""
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        state = cls(params, seed & MASK32)
        if params.penalised:
            prompt = torch.tensor(list(prompt_ids), dtype=torch.int64, device=device)
            state.prompt_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            state.prompt_mask[prompt] = True
            outputs = prompt[len(prompt) - params.step_offset :]
            state.counts = torch.bincount(outputs, minlength=vocab).to(torch.int32)
        if params.min_tokens:
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
            state.suppress_ids = torch.tensor(sorted(ends), dtype=torch.int64, device=device)
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            state.bias_ids = torch.tensor(ids, dtype=torch.int64, device=device)
            state.bias_values = torch.tensor(values, dtype=torch.float32, device=device)
        if params.grammar is not None:
            state.matcher = params.grammar.matcher()
            for token in list(prompt_ids)[len(prompt_ids) - params.step_offset :]:
                state.matcher.accept(token)
        return state

    def observe(self, token: int) -> None:
        """Records a generated token (what the penalties count, where the grammar goes next)."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.matcher is not None:
            self.matcher.accept(token)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix on int64 holding 32-bit values (wrapping products keep the low bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, vocab], a pure function of each row's (seed, step)."""
    row = _mix32((seeds * 0x9E3779B1 + steps) & MASK32)
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    bits = _mix32((row[:, None] ^ _mix32(ids + 0x632BE5AB)[None, :]) & MASK32)
    return (bits.double() + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, states: list[SamplingState], steps: list[int]) -> torch.Tensor:
    """logits [B, V] fp32; steps[i] = tokens row i has generated so far. Returns token ids [B]."""
    device = logits.device
    logits = process_logits(logits, states, steps)
    greedy = logits.argmax(-1)
    temps = torch.tensor([s.params.temperature for s in states], dtype=torch.float32, device=device)
    stochastic = temps > 0
    if not bool(stochastic.any()):
        return greedy
    scaled = logits / temps.clamp(min=1e-6)[:, None]
    vocab = logits.shape[1]
    top_k = torch.tensor([s.params.top_k or vocab for s in states], device=device).clamp(max=vocab)
    top_p = torch.tensor([s.params.top_p for s in states], dtype=torch.float32, device=device)
    sorted_logits, order = scaled.sort(-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = (rank >= top_k[:, None]) | (mass_before >= top_p[:, None])
    drop[:, 0] = False
    filtered = scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    seeds = torch.tensor([s.seed for s in states], dtype=torch.int64, device=device)
    noise = uniform_noise(seeds, torch.tensor(steps, dtype=torch.int64, device=device), vocab)
    # exponential race: argmax p / E with E ~ Exp(1) is a draw from p
    race = filtered.softmax(-1).double() / (-noise.log())
    return torch.where(stochastic, race.argmax(-1), greedy)
