import pytest
import torch
from transformers import AfmoeConfig, DeepseekV3Config, GptOssConfig
from transformers.models.afmoe.modeling_afmoe import AfmoeTokenChoiceRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from router.config import ModelConfig
from router.gating import GATING, afmoe_sigmoid_topk, softmax_topk, topk_softmax
from router.gpt_oss import BiasedGate

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def _reference_router(num_experts: int, k: int, route_scale: float) -> AfmoeTokenChoiceRouter:
    """transformers' AFMoE router with an identity gate, so that its input is the router logits."""
    config = AfmoeConfig(
        hidden_size=num_experts,
        num_experts=num_experts,
        num_experts_per_tok=k,
        route_scale=route_scale,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
    )
    router = AfmoeTokenChoiceRouter(config)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def _by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows reordered by expert id, so that two selections compare as sets."""
    order = ids.argsort(dim=1)
    return ids.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize(("num_experts", "k", "route_scale"), [(8, 1, 1.0), (16, 4, 2.826), (32, 8, 1.5)])
def test_afmoe_sigmoid_topk_matches_transformers(num_experts: int, k: int, route_scale: float) -> None:
    gen = torch.Generator().manual_seed(num_experts + k)
    logits = torch.randn(64, num_experts, generator=gen) * 3
    bias = torch.randn(num_experts, generator=gen) * 0.5
    router = _reference_router(num_experts, k, route_scale)
    with torch.no_grad():
        ref_logits, ref_weights, ref_ids = router(logits[None], bias)
    assert torch.equal(ref_logits, logits)  # the identity gate passes the logits through unchanged

    ids, weights = afmoe_sigmoid_topk(logits, bias, k, route_scale)

    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (64, k)
    ids_sorted, weights_sorted = _by_expert(ids, weights)
    ref_ids_sorted, ref_weights_sorted = _by_expert(ref_ids, ref_weights)
    assert torch.equal(ids_sorted, ref_ids_sorted)
    torch.testing.assert_close(weights_sorted, ref_weights_sorted, atol=1e-6, rtol=1e-6)


def test_afmoe_selection_uses_the_bias_but_the_weights_do_not() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    unbiased_ids, _ = afmoe_sigmoid_topk(logits, None, 2, 1.0)
    assert sorted(unbiased_ids[0].tolist()) == [0, 1]

    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    ids, weights = afmoe_sigmoid_topk(logits, bias, 2, 1.0)
    assert sorted(ids[0].tolist()) == [0, 3]  # expert 3 wins through its bias alone
    scores = torch.sigmoid(logits[0, [0, 3]])
    expected = dict(zip([0, 3], (scores / scores.sum()).tolist(), strict=True))
    for e, w in zip(ids[0].tolist(), weights[0].tolist(), strict=True):
        assert w == pytest.approx(expected[e], abs=1e-6)
    assert expected[3] < 0.5  # the bias would have made expert 3 dominant had it entered the weights


def test_afmoe_weights_ignore_a_bias_that_keeps_the_selection() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 16, generator=gen)
    bias = torch.randn(16, generator=gen)
    ids, weights = afmoe_sigmoid_topk(logits, bias, 4, 1.0)
    shifted_ids, shifted_weights = afmoe_sigmoid_topk(logits, bias + 7.0, 4, 1.0)  # same order, same picks
    assert torch.equal(ids, shifted_ids)
    torch.testing.assert_close(weights, shifted_weights, atol=0, rtol=0)
    expected = torch.sigmoid(logits).gather(1, ids)
    torch.testing.assert_close(weights, expected / expected.sum(1, keepdim=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gating", [afmoe_sigmoid_topk, softmax_topk])
def test_route_scale_multiplies_the_weights(gating) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 12, generator=gen)
    ids1, w1 = gating(logits, None, 3, 1.0)
    ids2, w2 = gating(logits, None, 3, 2.5)
    assert torch.equal(ids1, ids2)
    torch.testing.assert_close(w2, w1 * 2.5)
    torch.testing.assert_close(w1.sum(1), torch.ones(20))
    torch.testing.assert_close(w2.sum(1), torch.full((20,), 2.5))


def test_softmax_topk_selects_the_largest_logits_with_renormalised_probabilities() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, 10, generator=gen) * 2
    ids, weights = softmax_topk(logits, None, 3, 1.7)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids.sort(1).values, logits.topk(3, dim=1).indices.sort(1).values)
    torch.testing.assert_close(weights.sum(1), torch.full((40,), 1.7))
    # weights keep the softmax ratios: w_i / w_j = exp(l_i - l_j)
    chosen = logits.gather(1, ids)
    ratio = weights[:, 1:] / weights[:, :1]
    torch.testing.assert_close(ratio, torch.exp(chosen[:, 1:] - chosen[:, :1]), rtol=1e-5, atol=1e-6)
    assert (weights[:, :-1] >= weights[:, 1:]).all()


def test_gating_runs_in_fp32_for_bf16_logits() -> None:
    logits = torch.randn(5, 8).bfloat16()
    for gating in GATING.values():
        ids, weights = gating(logits, None, 2, 1.0)
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32


def test_gating_table_names_the_functions() -> None:
    assert GATING["afmoe_sigmoid"] is afmoe_sigmoid_topk
    assert GATING["softmax"] is softmax_topk
    assert GATING["topk_softmax"] is topk_softmax


@pytest.mark.parametrize(("num_experts", "k"), [(7, 2), (32, 4)])
def test_gpt_oss_router_matches_transformers(num_experts: int, k: int) -> None:
    """Top-k of the biased logits, softmax over those k only: the bias moves selection and weights."""
    hidden = 16
    fields = dict(hidden_size=hidden, num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=8)
    raw = fields | dict(num_hidden_layers=1, intermediate_size=8, num_local_experts=num_experts,
                        num_experts_per_tok=k, architectures=["GptOssForCausalLM"])  # fmt: skip
    reference = GptOssTopKRouter(GptOssConfig(**raw))
    gate = BiasedGate(ModelConfig.from_dict(raw))
    gen = torch.Generator().manual_seed(num_experts)
    with torch.no_grad():
        for param in (reference.weight, reference.bias):
            param.copy_(torch.randn(param.shape, generator=gen))
        gate.load_state_dict(reference.state_dict())
        x = torch.randn(50, hidden, generator=gen)
        _, ref_weights, ref_ids = reference(x)
        ids, weights = gate(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-6)
    unbiased_ids, _ = topk_softmax(torch.nn.functional.linear(x, gate.weight), None, k, 1.0)
    assert not torch.equal(unbiased_ids, ids)


def _deepseek_router(num_experts: int, k: int, n_group: int, topk_group: int, norm: bool, scale: float):
    """transformers' DeepSeek-V3 router with an identity gate and a random selection bias."""
    config = DeepseekV3Config(
        hidden_size=num_experts,
        n_routed_experts=num_experts,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        num_attention_heads=1,
    )
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
        router.e_score_correction_bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(k))
    return router


@pytest.mark.parametrize(
    ("num_experts", "k", "n_group", "topk_group", "norm", "scale"),
    [(10, 3, 2, 1, True, 2.5), (12, 4, 4, 2, False, 1.5), (16, 6, 8, 3, True, 1.0)],
)
def test_grouped_sigmoid_topk_matches_transformers(num_experts, k, n_group, topk_group, norm, scale) -> None:
    gen = torch.Generator().manual_seed(num_experts)
    logits = torch.randn(128, num_experts, generator=gen) * 2
    router = _deepseek_router(num_experts, k, n_group, topk_group, norm, scale)
    with torch.no_grad():
        _, ref_weights, ref_ids = router(logits)
    gating = GATING["sigmoid_grouped" if norm else "sigmoid_grouped_unnormalised"]

    ids, weights = gating(
        logits, router.e_score_correction_bias, k, scale, n_group=n_group, topk_group=topk_group
    )

    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    ids_sorted, weights_sorted = _by_expert(ids, weights)
    ref_ids_sorted, ref_weights_sorted = _by_expert(ref_ids, ref_weights)
    assert torch.equal(ids_sorted, ref_ids_sorted)
    torch.testing.assert_close(weights_sorted, ref_weights_sorted, atol=1e-6, rtol=1e-6)
    per_group = num_experts // n_group
    groups_used = (ids // per_group).unique(dim=None, sorted=False)
    assert groups_used.numel() > topk_group  # different tokens pick different groups...
    assert all(len(set((row // per_group).tolist())) <= topk_group for row in ids)  # ...each from few


def test_grouped_selection_skips_the_best_expert_of_a_weaker_group() -> None:
    # group 0 = experts 0-2, group 1 = experts 3-5; group 1's two best sum higher, though expert 0 is best
    logits = torch.tensor([[4.0, -3.0, -3.0, 2.0, 2.0, 1.0]])
    ids, weights = GATING["sigmoid_grouped"](logits, None, 2, 1.0, n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [3, 4]
    torch.testing.assert_close(weights.sum(1), torch.ones(1))
    flat, _ = GATING["sigmoid_grouped"](logits, None, 2, 1.0, n_group=1, topk_group=1)
    assert sorted(flat[0].tolist()) == [0, 3]
