"""MoELayer from parts: one's own router scoring and one's own experts on the shared dispatch."""
import copy

import pytest
import torch
from torch import nn

from moemix.layers import GroupedExperts, MoELayer, RoutedExperts, SparseMoE, TopKRouter, grouped_matmul, plan_dispatch
from moemix.losses import collect_aux_loss

from tests.layers._reference import output_and_grads

D, DOUT, E = 12, 7, 5


class LinearExperts(RoutedExperts):
    """One ``[D, D']`` matrix per expert, on the expert buffer."""

    def __init__(self, num_experts, in_features, out_features):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features))

    def forward(self, rows, plan):
        return grouped_matmul(rows, self.weight, plan)


class TokenIdRouter(TopKRouter):
    """Scores from a fixed table by token position (its own ``gate_logits``): token ``t`` prefers
    experts ``t % E`` then ``(t + 1) % E``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight.requires_grad_(False)

    def gate_logits(self, x):
        t = torch.arange(x.shape[0], device=x.device)
        logits = torch.zeros(x.shape[0], self.num_experts, device=x.device)
        logits[t, t % self.num_experts] = 2.0
        logits[t, (t + 1) % self.num_experts] = 1.0
        return logits


class RecordingExperts(LinearExperts):
    """Remembers how many rows its forward was given."""

    def forward(self, rows, plan):
        self.rows_seen = rows.shape[0]
        return super().forward(rows, plan)


def reference(layer, x):
    """``sum_j w_j x @ W_{i_j}`` with the layer's own routing, by a loop over tokens and choices."""
    tokens = x.reshape(-1, D)
    decision = layer.router(tokens)
    out = tokens.new_zeros(tokens.shape[0], layer.out_features)
    for t in range(tokens.shape[0]):
        for j in range(decision.indices.shape[1]):
            if decision.kept is None or decision.kept[t, j]:
                out[t] += decision.weights[t, j] * (tokens[t] @ layer.experts.weight[decision.indices[t, j]])
    return out.reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("layout", ["auto", "sorted", "padded", "grouped_mm"])
def test_own_experts_match_the_reference(layout):
    torch.manual_seed(0)
    dout = 8 if layout == "grouped_mm" else DOUT  # F.grouped_mm wants 16-byte rows
    layer = MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, dout), dispatch_layout=layout)
    x = torch.randn(3, 4, D)
    out, grad_x, grads = output_and_grads(layer, x, layer)
    ref, ref_grad_x, ref_grads = output_and_grads(layer, x, lambda v: reference(layer, v))
    assert out.shape == (3, 4, dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(ref_grads) == {"router.weight", "experts.weight"}
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)
    assert layer.tokens_per_expert.sum().item() == 12 * 2 and layer.dropped_tokens == 0


@pytest.mark.parametrize("layout", ["auto", "sorted"])
def test_dropped_assignments_never_reach_the_experts_and_add_nothing(layout):
    torch.manual_seed(0)
    router = TopKRouter(D, E, 2, capacity_factor=0.5)
    layer = MoELayer(router, RecordingExperts(E, D, DOUT), dispatch_layout=layout)
    x = torch.randn(20, D)
    out, grad_x, grads = output_and_grads(layer, x, layer)
    ref, ref_grad_x, ref_grads = output_and_grads(layer, x, lambda v: reference(layer, v))
    assert layer.dropped_tokens == router(x).num_dropped > 0
    assert layer.experts.rows_seen == 20 * 2 - layer.dropped_tokens
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5)


def test_own_router_scoring_routes_as_it_says():
    torch.manual_seed(0)
    layer = MoELayer(TokenIdRouter(D, E, 2), LinearExperts(E, D, DOUT))
    x = torch.randn(2 * E, D)
    out = layer(x)
    assert layer.tokens_per_expert.tolist() == [4] * E  # every expert first choice of 2 tokens, second of 2
    torch.testing.assert_close(out, reference(layer, x), atol=1e-5, rtol=1e-5)
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.experts.weight]


def test_own_router_scoring_keeps_the_noise():
    torch.manual_seed(0)
    router = TokenIdRouter(D, E, 2, noise="normal")
    x = torch.randn(6, D)
    noisy = router.compute_logits(x)
    assert not torch.equal(noisy, router.gate_logits(x))
    torch.testing.assert_close(noisy, router.gate_logits(x), atol=5 / E, rtol=0)  # noise N(0, (1/E)^2)
    router.eval()
    assert torch.equal(router.compute_logits(x), router.gate_logits(x))


def test_unselected_experts_get_zero_gradient():
    torch.manual_seed(0)
    layer = MoELayer(TokenIdRouter(D, E, 1), LinearExperts(E, D, DOUT))
    layer(torch.randn(3, D)).sum().backward()  # tokens 0, 1, 2 go to experts 0, 1, 2
    grad = layer.experts.weight.grad
    assert grad[3:].abs().sum() == 0 and (grad[:3].abs().sum(dim=(1, 2)) > 0).all()


def test_parts_built_in_order_equal_sparse_moe():
    torch.manual_seed(0)
    moe = SparseMoE(D, 16, act_layer="silu", glu=True, num_experts=E, k=2, shared_expert="gated")
    torch.manual_seed(0)  # the same parts, built in SparseMoE's order: the same initial weights
    layer = MoELayer(TopKRouter(D, E, 2), GroupedExperts(E, D, 16, act_layer="silu", glu=True),
                     shared_expert=GroupedExperts(1, D, 16, act_layer="silu", glu=True),
                     shared_gate=nn.Linear(D, 1, bias=False))
    assert list(layer.state_dict()) == list(moe.state_dict())
    for name, value in moe.state_dict().items():
        assert torch.equal(layer.state_dict()[name], value), name
    x = torch.randn(2, 9, D)
    out, grad_x, grads = output_and_grads(layer, x, layer)
    ref, ref_grad_x, ref_grads = output_and_grads(moe, x, moe)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad_x, ref_grad_x)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name])
    torch.testing.assert_close(layer.aux_loss, moe.aux_loss)
    assert layer.aux_losses.keys() == moe.aux_losses.keys()


def test_deepcopy_after_a_training_forward_and_zero_tokens():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, DOUT))
    x = torch.randn(7, D)
    layer(x)
    twin = copy.deepcopy(layer)  # aux_loss holds a graph; it is not copied
    torch.testing.assert_close(twin(x), layer(x))
    empty = layer(torch.randn(0, 3, D))
    assert empty.shape == (0, 3, DOUT) and layer.tokens_per_expert.sum() == 0


def test_averaged_shared_expert_of_any_module():
    torch.manual_seed(0)
    shared = nn.Linear(D, DOUT)
    layer = MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, DOUT), shared_expert=shared)
    x = torch.randn(6, D)
    torch.testing.assert_close(layer(x), (reference(layer, x) + shared(x)) / 2, atol=1e-5, rtol=1e-5)


def test_aux_losses_reach_collect_aux_loss():
    torch.manual_seed(0)
    model = nn.Sequential(MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, D), aux_loss="importance"),
                          MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, D), z_loss_coef=0.0))
    model(torch.randn(8, D))
    assert set(model[0].aux_losses) == {"loss_importance_load", "loss_z"}
    assert set(model[1].aux_losses) == {"loss_balance"}
    torch.testing.assert_close(collect_aux_loss(model), model[0].aux_loss + model[1].aux_loss)


def test_sparse_moe_state_dict_keys_are_unchanged():
    moe = SparseMoE(D, 16, num_experts=E, shared_expert="gated")
    assert list(moe.state_dict()) == ["router.weight", "experts.w1", "experts.b1", "experts.w2", "experts.b2",
                                      "shared_expert.w1", "shared_expert.b1", "shared_expert.w2",
                                      "shared_expert.b2", "shared_gate.weight"]


def test_single_grouped_expert_runs_dense_without_a_plan():
    torch.manual_seed(0)
    one = GroupedExperts(1, D, 16)
    x = torch.randn(5, D)
    torch.testing.assert_close(one(x), one(x, plan_dispatch(torch.zeros(5, 1, dtype=torch.long), 1)))
    with pytest.raises(ValueError, match="plan may be None only with a single expert"):
        GroupedExperts(2, D, 16)(x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(router=nn.Linear(D, E)), "router must have an int attribute 'num_experts'"),
    (dict(router="softmax"), "router must be an nn.Module"),
    (dict(experts=nn.Linear(D, DOUT)), "experts must have 'num_experts'"),
    (dict(experts=LinearExperts(E + 1, D, DOUT)), r"experts.num_experts must equal router.num_experts=5, got 6"),
    (dict(experts=LinearExperts(E, D + 1, DOUT)), r"experts.in_features must equal router.in_features=12, got 13"),
    (dict(shared_gate=nn.Linear(D, 1)), "shared_gate applies only with a shared_expert"),
    (dict(shared_expert=nn.Linear(D, DOUT + 1)), r"shared_expert.out_features must equal experts.out_features=7"),
    (dict(shared_expert=nn.Linear(D + 1, DOUT)), r"shared_expert.in_features must equal experts.in_features=12"),
    (dict(aux_loss="balance"), "aux_loss"),
    (dict(dispatch_layout="fast"), "dispatch_layout"),
    (dict(router=TopKRouter(D, E, 2, capacity_factor=1.0), dispatch_layout="padded"), "capacity_factor"),
])
def test_bad_parts_raise(kwargs, match):
    args = dict(router=TopKRouter(D, E, 2), experts=LinearExperts(E, D, DOUT))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoELayer(args.pop("router"), args.pop("experts"), **args)


def test_experts_without_forward_say_what_is_missing():
    class NoForward(RoutedExperts):
        num_experts, in_features, out_features = E, D, DOUT

    layer = MoELayer(TopKRouter(D, E, 2), NoForward())
    with pytest.raises(NotImplementedError, match="must implement forward"):
        layer(torch.randn(4, D))


def test_experts_returning_other_rows_are_refused():
    class OneRowShort(LinearExperts):
        def forward(self, rows, plan):
            return super().forward(rows, plan)[1:]

    layer = MoELayer(TopKRouter(D, E, 2), OneRowShort(E, D, DOUT), dispatch_layout="sorted")
    with pytest.raises(ValueError, match=r"OneRowShort.forward must return \[rows, out_features\] = \[40, 7\]"):
        layer(torch.randn(20, D))


def test_wrong_last_dimension_names_expected_and_got():
    layer = MoELayer(TopKRouter(D, E, 2), LinearExperts(E, D, DOUT))
    with pytest.raises(ValueError, match=r"MoELayer expected input of shape \[..., 12\], got last dimension 11"):
        layer(torch.randn(4, D - 1))


def test_own_experts_under_bfloat16_autocast():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(D, E, 2, capacity_factor=0.5), LinearExperts(E, D, DOUT))
    x = torch.randn(20, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.dropped_tokens > 0
    torch.testing.assert_close(out.float(), reference(layer, x.detach()), atol=0.1, rtol=0.05)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.experts.weight.grad).all()
