import math

import pytest
import torch

from router.sampling import SamplingParams, SamplingState, sample, uniform_noise

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _state(seed: int = 0, **params) -> SamplingState:
    return SamplingState(SamplingParams(**params), seed)


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _frequencies(logits_row: torch.Tensor, n: int, **params) -> torch.Tensor:
    """Token counts from n draws (seeds 0..n-1, step 0) of one row, made in a single batch."""
    tokens = sample(logits_row.expand(n, -1), [_state(seed, **params) for seed in range(n)], [0] * n)
    return torch.bincount(tokens, minlength=logits_row.numel()).double()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax() -> None:
    logits = _logits(6, 50, 0)
    tokens = sample(logits, [_state(seed) for seed in range(6)], [0, 1, 2, 3, 4, 5])
    assert torch.equal(tokens, logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = _logits(4, 100, 1)
    states = [_state(seed, temperature=1.0) for seed in (11, 12, 13, 14)]
    first = sample(logits, states, [3, 3, 3, 3])
    again = sample(logits, states, [3, 3, 3, 3])
    assert torch.equal(first, again)


def test_the_draw_changes_with_step_and_seed() -> None:
    flat = torch.zeros(1, 1000)  # uniform distribution: 1000 tokens equally likely
    by_step = {int(sample(flat, [_state(5, temperature=1.0)], [step])) for step in range(20)}
    by_seed = {int(sample(flat, [_state(seed, temperature=1.0)], [0])) for seed in range(20)}
    assert len(by_step) > 10
    assert len(by_seed) > 10


def test_seeded_draw_does_not_depend_on_the_rest_of_the_batch() -> None:
    vocab = 64
    logits = _logits(5, vocab, 2)
    target = _state(1234, temperature=0.9, top_p=0.95, top_k=20)
    others = [
        _state(1, temperature=0.0),
        _state(2, temperature=1.5),
        _state(3, temperature=0.7, top_k=3),
        _state(4, temperature=1.0, top_p=0.5),
    ]
    for step in range(25):
        alone = sample(logits[2:3], [target], [step])
        batch = sample(logits, [others[0], others[1], target, others[2], others[3]], [7, 0, step, 2, 9])
        assert int(batch[2]) == int(alone[0])
        # the greedy row of a mixed batch stays greedy
        assert int(batch[0]) == int(logits[0].argmax())


def test_top_k_one_is_greedy() -> None:
    logits = _logits(30, 40, 3)
    states = [_state(seed, temperature=1.3, top_k=1) for seed in range(30)]
    assert torch.equal(sample(logits, states, list(range(30))), logits.argmax(-1))


def test_tiny_top_p_is_greedy() -> None:
    logits = _logits(30, 40, 4)
    states = [_state(seed, temperature=2.0, top_p=1e-6) for seed in range(30)]
    assert torch.equal(sample(logits, states, list(range(30))), logits.argmax(-1))


def test_top_k_limits_the_support_to_the_k_largest_logits() -> None:
    logits = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    counts = _frequencies(logits[0], 2000, temperature=5.0, top_k=3)
    assert counts[:3].gt(0).all()
    assert counts[3:].eq(0).all()


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    counts = _frequencies(logits, 3000, temperature=1.0, top_p=0.7)  # 0.5 < 0.7 <= 0.5 + 0.3
    assert counts[0] == counts[2] == 0
    assert counts[1] > 0 and counts[3] > 0
    # renormalised over the kept tokens: 0.5 / 0.8 and 0.3 / 0.8
    assert _chi_square(counts[[1, 3]], torch.tensor([0.625, 0.375])) < 10.83  # p = 0.001, 1 dof


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(temperature: float) -> None:
    logits = torch.tensor([1.2, -0.3, 0.5, 2.0, 0.0, -1.0])
    counts = _frequencies(logits, 6000, temperature=temperature)
    probs = torch.softmax(logits / temperature, -1)
    assert _chi_square(counts, probs) < 20.52  # p = 0.001 with 5 degrees of freedom


def test_lower_temperature_sharpens() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5])
    top_share = [float(_frequencies(logits, 3000, temperature=t)[0]) / 3000 for t in (3.0, 1.0, 0.3)]
    assert top_share[0] < top_share[1] < top_share[2]
    assert top_share[2] > 0.8


def test_uniform_noise_is_open_unit_interval_and_pure() -> None:
    seeds = torch.tensor([0, 1, 2**32 - 1, 12345])
    steps = torch.tensor([0, 0, 7, 2**20])
    noise = uniform_noise(seeds, steps, 4096)
    assert noise.shape == (4, 4096)
    assert (noise > 0).all() and (noise < 1).all()
    assert torch.equal(noise, uniform_noise(seeds, steps, 4096))
    assert torch.equal(noise[2:3], uniform_noise(seeds[2:3], steps[2:3], 4096))
    assert abs(float(noise.mean()) - 0.5) < 0.01
    assert not torch.equal(noise[0], noise[1])


def test_sampling_state_seed() -> None:
    assert SamplingState.for_request(SamplingParams(seed=77)).seed == 77
    assert SamplingState.for_request(SamplingParams(seed=2**32 + 5)).seed == 5
    drawn = {SamplingState.for_request(SamplingParams()).seed for _ in range(8)}
    assert all(0 <= s < 2**31 for s in drawn)
    assert len(drawn) > 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", -3, "max_tokens"),
        ("temperature", -0.1, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", -0.5, "top_p"),
        ("top_p", 1.01, "top_p"),
        ("top_k", -1, "top_k"),
    ],
)
def test_sampling_params_validation(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_sampling_params_boundaries_are_valid() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0)
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (1, 0.0, 1.0, 0)
    assert SamplingParams(top_p=math.nextafter(0.0, 1.0)).top_p > 0
