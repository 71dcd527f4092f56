import math
import warnings

import pytest
import torch

from moemix.layers import SparseMoE, TopKRouter, expert_capacity


def test_weights_are_renormalised_topk_of_softmax():
    router = TopKRouter(8, 5, k=2)
    x = torch.randn(11, 8)
    d = router(x)
    probs = torch.softmax(x @ router.weight.t(), -1)
    top, idx = probs.topk(2, -1)
    torch.testing.assert_close(d.probs, probs)
    torch.testing.assert_close(d.weights, top / top.sum(-1, keepdim=True))
    assert torch.equal(d.indices, idx)
    assert d.kept is None and d.num_dropped == 0


def test_sigmoid_scores_without_renormalisation():
    router = TopKRouter(8, 5, k=3, score="sigmoid", renormalize=False)
    x = torch.randn(4, 8)
    d = router(x)
    torch.testing.assert_close(d.weights, torch.sigmoid(x @ router.weight.t()).topk(3, -1).values)


@pytest.mark.parametrize("per_expert", [False, True])
def test_cosine_logits_are_cosine_similarity_over_the_temperature(per_expert):
    torch.manual_seed(0)
    router = TopKRouter(8, 4, k=2, score="cosine", cosine_dim=5, temperature=0.5, per_expert_temperature=per_expert)
    assert router.log_inv_temperature.shape == ((4,) if per_expert else (1,))
    torch.testing.assert_close(router.log_inv_temperature.exp(), torch.full_like(router.log_inv_temperature, 2.0))
    with torch.no_grad():  # learned temperatures: 0.5, 0.25, 1, 0.001 (the last clamped to 0.01)
        if per_expert:
            router.log_inv_temperature.copy_(-torch.tensor([0.5, 0.25, 1.0, 1e-3]).log())
    x = torch.randn(6, 8) * 100
    h = x @ router.proj.weight.t()
    cosine = (h / h.norm(dim=-1, keepdim=True)) @ (router.weight / router.weight.norm(dim=-1, keepdim=True)).t()
    temperature = torch.tensor([0.5, 0.25, 1.0, 0.01]) if per_expert else torch.tensor(0.5)
    torch.testing.assert_close(router(x).logits, cosine / temperature)


def test_cosine_reset_parameters_restores_the_initial_temperature_and_projection():
    router = TopKRouter(8, 4, score="cosine")
    with torch.no_grad():
        router.log_inv_temperature.fill_(0.0)
        router.proj.weight.zero_()
    router.reset_parameters()
    torch.testing.assert_close(router.log_inv_temperature, torch.tensor([math.log(1 / 0.07)]))
    assert router.proj.weight.abs().sum() > 0


def test_router_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    router = TopKRouter(64, 4)
    x = torch.randn(50, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = router(x)
        bf16_logits = torch.nn.functional.linear(x, router.weight)  # what an autocast gate would compute
    assert d.logits.dtype == torch.float32 and d.weights.dtype == torch.float32
    exact = x.double() @ router.weight.double().t()
    assert (d.logits.double() - exact).abs().max() < 1e-5  # float32 accuracy, not bfloat16's
    assert (bf16_logits.double() - exact).abs().max() > 1e-3  # (bfloat16 would be this far off)


@pytest.mark.parametrize("noise", ["jitter", "gumbel", "normal"])
def test_noise_only_in_training(noise):
    router = TopKRouter(8, 4, noise=noise, noise_eps={"jitter": 0.5, "normal": 1.0}.get(noise))
    x = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(x).logits, router(x).logits)
    assert torch.equal(router(x).indices, router(x).indices)
    router.train()
    first, second = router(x), router(x)
    assert torch.isfinite(first.logits).all()
    if noise == "gumbel":  # the choice is sampled; logits and scores stay the clean ones
        assert not torch.equal(first.indices, second.indices)
        assert torch.equal(first.logits, second.logits)
    else:
        assert not torch.equal(first.logits, second.logits)


def test_gumbel_noise_samples_the_choice_from_the_softmax_and_keeps_clean_weights():
    """k = 1: DeepSpeed "RSample", the expert drawn from softmax(logits); k > 1: the clean top choice, then the
    others drawn from the softmax over the rest (GShard's sampled second expert). Weights stay the clean scores."""
    torch.manual_seed(0)
    router = TopKRouter(8, 4, k=1, noise="gumbel")
    x = torch.randn(1, 8).expand(20000, 8)
    clean = torch.softmax(x[:1] @ router.weight.t(), dim=-1)[0].detach()
    d = router(x)
    torch.testing.assert_close(d.logits, x @ router.weight.t())
    torch.testing.assert_close(d.weights, d.probs.gather(-1, d.indices))
    frequency = torch.bincount(d.indices[:, 0], minlength=4).float() / x.shape[0]
    torch.testing.assert_close(frequency, clean, atol=0.015, rtol=0)  # about 4 standard errors

    router_k2 = TopKRouter(8, 4, k=2, noise="gumbel")
    router_k2.weight.data.copy_(router.weight.data)
    d2 = router_k2(x)
    top = int(clean.argmax())
    assert (d2.indices[:, 0] == top).all()
    second = torch.bincount(d2.indices[:, 1], minlength=4).float() / x.shape[0]
    expected = clean.clone()
    expected[top] = 0
    torch.testing.assert_close(second, expected / expected.sum(), atol=0.015, rtol=0)
    picked = d2.probs.gather(-1, d2.indices)
    torch.testing.assert_close(d2.weights, picked / picked.sum(-1, keepdim=True))
    assert TopKRouter(8, 4, k=4, noise="gumbel")(torch.randn(5, 8)).indices.sort(-1).values.eq(
        torch.arange(4)).all()  # k = E: every expert once


def test_normal_noise_scale_is_eps_over_num_experts():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, noise="normal", noise_eps=2.0)
    x = torch.randn(20000, 8)
    clean = x @ router.weight.t()
    noise_std = (router(x).logits - clean).std().item()
    assert math.isclose(noise_std, 2.0 / 4, rel_tol=0.05)


def test_expert_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25) == 2 * int(1.25 * 13)


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_experts=4, k=5), "k"),
    (dict(num_experts=4, k=0), "k"),
    (dict(num_experts=0, k=1), "num_experts"),
    (dict(num_experts=4, score="softmax2"), "score"),
    (dict(num_experts=4, noise="uniform"), "noise"),
    (dict(num_experts=4, capacity_factor=0.0), "capacity_factor"),
    (dict(num_experts=4, noise="jitter", noise_eps=1.5), "noise_eps"),
    (dict(num_experts=4, score="cosine", cosine_dim=0), "cosine_dim"),
])
def test_bad_router_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TopKRouter(8, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(in_features=0), "in_features"),
    (dict(in_features=8, hidden_features=-1), "hidden_features"),
    (dict(in_features=8, num_experts=2, k=3), "k"),
    (dict(in_features=8, aux_loss="foo"), "aux_loss"),
    (dict(in_features=8, shared_expert="foo"), "shared_expert"),
    (dict(in_features=8, drop=1.5), "drop"),
    (dict(in_features=8, act_layer="nope"), "act_layer"),
    (dict(in_features=8, hidden_features=0), "hidden_features"),
    (dict(in_features=8, out_features=0), "out_features"),
    (dict(in_features=8, shared_expert="gated", shared_hidden_features=0), "shared_hidden_features"),
    (dict(in_features=8, drop=(0.1, 0.2, 0.3)), "drop"),
    (dict(in_features=8, bias=(True,)), "bias"),
    (dict(in_features=8, capacity_factor=1.0, dispatch_layout="padded"), "dispatch_layout"),
])
def test_bad_moe_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SparseMoE(**kwargs)


def test_wrong_last_dimension_reports_expected_and_got():
    moe = SparseMoE(8, 16, num_experts=4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\].*got last dimension 7"):
        moe(torch.randn(3, 7))


@pytest.mark.parametrize("args, name", [
    ((10, 0, 2, 1.0), "num_experts"),
    ((10, 4, 0, 1.0), "k"),
    ((10, 4, 2, 0.0), "capacity_factor"),
    ((-1, 4, 2, 1.0), "num_tokens"),
])
def test_expert_capacity_rejects_bad_arguments(args, name):
    with pytest.raises(ValueError, match=name):
        expert_capacity(*args)


def test_a_capacity_of_zero_warns_that_every_assignment_is_dropped():
    router = TopKRouter(8, 4, k=2, capacity_factor=0.3)  # k * int(0.3 * ceil(8 / 4)) = 0
    with pytest.warns(UserWarning, match="capacity of 0 for 8 tokens and 4 experts"):
        d = router(torch.randn(8, 8))
    assert d.num_dropped == 16 and d.capacity == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        router(torch.randn(0, 8))  # no tokens, nothing dropped
        router(torch.randn(16, 8))  # capacity 2 * int(0.3 * 4) = 2


def test_capacity_decision_counts_its_drops_on_demand():
    router = TopKRouter(8, 4, k=2, capacity_factor=0.5)
    d = router(torch.randn(40, 8))
    assert d.capacity == expert_capacity(40, 4, 2, 0.5)
    assert d.num_dropped == int((~d.kept).sum()) > 0
    assert torch.equal(d.weights == 0, ~d.kept | (d.weights == 0))


def test_renormalize_defaults_to_the_papers_and_warns_when_it_would_cut_the_router_off():
    assert TopKRouter(8, 4, k=2).renormalize and not TopKRouter(8, 4, k=1).renormalize
    router = TopKRouter(8, 4, k=1)
    x = torch.randn(16, 8)
    d = router(x)
    torch.testing.assert_close(d.weights, d.probs.max(dim=-1, keepdim=True).values)  # Switch: y = p * E(x)
    with pytest.warns(UserWarning, match="renormalize=True with k=1"):
        TopKRouter(8, 4, k=1, renormalize=True)


def test_arguments_that_would_have_no_effect_or_bad_values_raise():
    with pytest.raises(ValueError, match="noise_eps applies to noise='jitter' or 'normal'"):
        TopKRouter(8, 4, noise_eps=0.1)
    with pytest.raises(ValueError, match="noise_eps applies"):
        TopKRouter(8, 4, noise="gumbel", noise_eps=0.1)
    with pytest.raises(ValueError, match="init_std must be a finite number >= 0"):
        TopKRouter(8, 4, init_std=-1.0)
    with pytest.raises(ValueError, match="cosine_dim applies to score='cosine', got score='softmax'"):
        TopKRouter(8, 4, cosine_dim=3)
    with pytest.raises(ValueError, match="temperature applies to score='cosine'"):
        TopKRouter(8, 4, temperature=0.5)
    with pytest.raises(ValueError, match="per_expert_temperature applies to score='cosine'"):
        TopKRouter(8, 4, score="sigmoid", per_expert_temperature=True)
    with pytest.raises(ValueError, match="temperature must be >= 0.01"):
        TopKRouter(8, 4, score="cosine", temperature=0.001)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        TopKRouter(8, 4, score="cosine", temperature=float("nan"))
    with pytest.raises(ValueError, match="per_expert_temperature must be True or False"):
        TopKRouter(8, 4, score="cosine", per_expert_temperature=1)
    with pytest.raises(ValueError, match="renormalize must be True or False"):
        TopKRouter(8, 4, renormalize="no")
    for name, value in (("capacity_factor", float("inf")), ("capacity_factor", True), ("noise_eps", float("inf")),
                        ("init_std", float("nan"))):
        kwargs = {name: value, **({"noise": "normal"} if name == "noise_eps" else {})}
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            TopKRouter(8, 4, **kwargs)
    with pytest.raises(ValueError, match="floating-point input"):
        TopKRouter(8, 4)(torch.ones(3, 8, dtype=torch.long))


def test_renormalized_sigmoid_weights_stay_finite_when_every_score_underflows():
    router = TopKRouter(4, num_experts=3, k=2, score="sigmoid", renormalize=True)
    with torch.no_grad():
        router.weight.fill_(1.0)
    decision = router(torch.full((2, 4), -100.0))  # logits -400: sigmoid underflows to 0 in float32
    assert torch.isfinite(decision.weights).all() and not decision.weights.any()


def test_renormalized_softmax_weights_sum_to_one_even_for_extreme_logits():
    router = TopKRouter(4, num_experts=3, k=2, renormalize=True)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1e3] * 4, [-1e3] * 4, [0.0] * 4]))
    decision = router(torch.tensor([[1.0] * 4, [-1.0] * 4]))
    torch.testing.assert_close(decision.weights.sum(-1), torch.ones(2))
