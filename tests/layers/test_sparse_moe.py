import pytest
import torch
from torch import nn

from moemix.layers import SparseMoE
from moemix.losses import collect_aux_loss
from tests.layers._reference import assert_matches_reference, reference_moe


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("num_experts", 6)
    kw.setdefault("k", 2)
    return SparseMoE(16, 24, **kw).double()


class _ViewOfInput(nn.Module):
    """An activation whose output is a view of its input (must not be scaled in place)."""

    def forward(self, x):
        return x.view_as(x)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(dispatch_layout="sorted"),
    dict(dispatch_layout="sorted", glu=True, bias=False, k=3),
    dict(dispatch_layout="sorted", glu=True, act_layer="gelu"),
    dict(dispatch_layout="sorted", act_layer="gelu_tanh"),
    dict(dispatch_layout="sorted", act_layer="relu"),
    dict(dispatch_layout="sorted", act_layer="tanh", glu=True),
    dict(dispatch_layout="sorted", act_layer="sigmoid"),
    dict(dispatch_layout="sorted", act_layer="identity", glu=True),
    dict(dispatch_layout="sorted", act_layer=nn.Softplus),
    dict(dispatch_layout="sorted", act_layer=nn.Hardswish, glu=True, bias=False),
    dict(dispatch_layout="sorted", act_layer=lambda: nn.SiLU(inplace=True), glu=True),
    dict(dispatch_layout="sorted", act_layer=lambda: nn.ReLU(inplace=True)),
    dict(dispatch_layout="sorted", act_layer=_ViewOfInput, bias=False),
    dict(dispatch_layout="sorted", act_layer=_ViewOfInput, glu=True),  # not recomputable: stock autograd
    dict(dispatch_layout="sorted", act_layer=nn.PReLU, glu=True),  # parameters: stock autograd
    dict(dispatch_layout="padded"),
    dict(dispatch_layout="padded", glu=True, bias=False),
    dict(dispatch_layout="padded", act_layer=lambda: nn.SiLU(inplace=True), glu=True),
    dict(glu=True, act_layer="silu", bias=False),
    dict(score="sigmoid", renormalize=False),
    dict(score="cosine"),
    dict(num_experts=3, k=3),
    dict(k=1),
])
def test_output_and_gradients_equal_reference_loop(kw):
    assert_matches_reference(_pair(**kw), torch.randn(50, 16, dtype=torch.float64))


def test_identical_experts_equal_dense_ffn():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
    moe = SparseMoE(16, 32, num_experts=4, k=2)
    moe.experts.load_dense(fc1, fc2)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), fc2(nn.functional.gelu(fc1(x))), atol=1e-5, rtol=1e-5)


def test_k_equal_e_is_probability_weighted_sum_of_all_experts():
    moe = _pair(num_experts=4, k=4)
    x = torch.randn(20, 16, dtype=torch.float64)
    probs = moe.router(x).probs
    ex = moe.experts
    each = torch.stack([ex.act(x @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e] for e in range(4)], 1)
    torch.testing.assert_close(moe(x), (probs.unsqueeze(-1) * each).sum(1))


def test_unselected_experts_get_zero_gradient():
    moe = _pair(num_experts=8, k=1)
    with torch.no_grad():  # route everything to experts 0 and 1
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
        moe.router.weight[1, 0] = -10.0
    x = torch.randn(30, 16, dtype=torch.float64)
    moe(x).sum().backward()
    used = moe.tokens_per_expert > 0
    assert used.sum() == 2
    assert torch.all(moe.experts.w1.grad[~used] == 0) and torch.all(moe.experts.b2.grad[~used] == 0)
    assert torch.all(moe.experts.w1.grad[used].abs().sum((1, 2)) > 0)


@pytest.mark.parametrize("shape", [(10, 16), (2, 5, 16), (2, 3, 4, 16), (16,)])
def test_forward_preserves_leading_shape(shape):
    moe = SparseMoE(16, 8, 12, num_experts=4, k=2)
    assert moe(torch.randn(shape)).shape == (*shape[:-1], 12)


@pytest.mark.parametrize("layout", ["auto", "sorted", "padded"])
def test_fewer_tokens_than_experts_and_empty_input(layout):
    moe = SparseMoE(16, 8, num_experts=32, k=2, dispatch_layout=layout).double()
    x = torch.randn(3, 16, dtype=torch.float64)
    assert_matches_reference(moe, x)  # 26 or more experts get no token and a zero gradient
    chosen = moe.router(x).indices
    assert torch.equal(moe.tokens_per_expert, torch.bincount(chosen.reshape(-1), minlength=32))
    assert int(moe.tokens_per_expert.sum()) == 6
    empty = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    out = moe(empty)
    assert out.shape == (0, 16) and int(moe.tokens_per_expert.sum()) == 0
    out.sum().backward()
    assert empty.grad.shape == (0, 16)


def test_aux_loss_reaches_collect_aux_loss():
    model = nn.Sequential(SparseMoE(16, 8, num_experts=4), nn.ReLU(), SparseMoE(16, 8, num_experts=4, aux_loss="importance"))
    model(torch.randn(10, 16))
    total = collect_aux_loss(model)
    assert torch.allclose(total, model[0].aux_loss + model[2].aux_loss)
    assert set(model[0].aux_losses) == {"loss_balance", "loss_z"}
    total.backward()
    assert model[0].router.weight.grad.abs().sum() > 0


def test_collect_aux_loss_without_moe_is_zero():
    assert collect_aux_loss(nn.Linear(3, 3)).item() == 0.0


def test_capacity_mode_drops_exactly_the_overflow():
    moe = _pair(num_experts=4, k=1, capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 0
        moe.router.weight.zero_()
        moe.router.weight[0].fill_(0.0)
        moe.router.weight[1:].fill_(-1.0)
    x = torch.rand(40, 16, dtype=torch.float64)  # positive inputs: logit 0 beats negative ones
    out = moe(x)
    capacity = 10  # k * int(1.0 * ceil(40 / 4))
    assert moe.tokens_per_expert.tolist() == [capacity, 0, 0, 0]
    assert moe.dropped_tokens == 30
    assert torch.all(out[capacity:] == 0) and torch.all(out[:capacity].abs().sum(-1) > 0)
    got = _output_and_grads(moe, x, with_aux=False)
    ref = _output_and_grads(_ReferenceModule(moe), x, with_aux=False)
    for g, w in zip(got, ref):
        torch.testing.assert_close(g, w)
    assert torch.all(got[1][capacity:] == 0)  # dropped tokens get no gradient through the experts


class _ReferenceModule(nn.Module):
    """The straightforward loop over experts with ``moe``'s parameters (and its aux loss)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return reference_moe(self.moe, x)


def test_capacity_priority_first_choices_before_second():
    from moemix.layers.router import RoutingDecision, apply_capacity
    idx = torch.tensor([[0, 1], [0, 1], [1, 0]])
    d = RoutingDecision(logits=torch.zeros(3, 2), probs=torch.full((3, 2), 0.5), weights=torch.ones(3, 2), indices=idx)
    apply_capacity(d, 2)
    # expert 0: first choices of tokens 0, 1 fill it, token 2's second choice is dropped;
    # expert 1: token 2's first choice, then token 0's second choice; token 1's second is dropped
    assert d.kept.tolist() == [[True, True], [True, False], [True, False]]
    assert d.num_dropped == 2
    assert d.weights.tolist() == [[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]]


def test_shared_experts():
    x = torch.randn(10, 16)
    gated = SparseMoE(16, 8, num_experts=4, shared_expert="gated")
    sparse_only = gated._experts_forward(x, gated.router(x))
    shared = gated.shared_expert(x)
    torch.testing.assert_close(gated(x), sparse_only + torch.sigmoid(gated.shared_gate(x)) * shared)
    averaged = SparseMoE(16, 8, num_experts=4, shared_expert="averaged")
    torch.testing.assert_close(averaged(x), (averaged._experts_forward(x, averaged.router(x))
                                             + averaged.shared_expert(x)) / 2)


@pytest.mark.parametrize("kw", [{}, {"glu": True, "act_layer": "silu", "dispatch_layout": "sorted"},
                                {"glu": True, "dispatch_layout": "padded"},
                                {"glu": True, "act_layer": "silu", "dispatch_layout": "grouped_mm"}])
def test_bf16_autocast(kw):
    moe = SparseMoE(16, 32, num_experts=4, **kw)
    x = torch.randn(2, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        decision = moe.router(x.reshape(-1, 16))
    assert y.dtype == torch.bfloat16 and decision.logits.dtype == torch.float32
    y.float().sum().backward()
    assert moe.experts.w1.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), moe(x), atol=0.1, rtol=0.05)


def _output_and_grads(module, x, with_aux=True):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = module(x)
    (y.square().sum() + (collect_aux_loss(module) if with_aux else 0)).backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("kw", [{}, {"capacity_factor": 1.0, "shared_expert": "gated", "glu": True,
                                     "act_layer": "silu"}])
def test_torch_compile_matches_eager(backend, kw):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, **kw).double()  # float64 experts and router
    x = torch.randn(12, 16, dtype=torch.float64)
    compiled = torch.compile(moe, backend=backend)
    got = _output_and_grads(compiled, x)
    want = _output_and_grads(moe, x)
    assert all(g is not None for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("glu", [False, True])
def test_double_backward_raises_instead_of_dropping_terms(layout, glu):
    moe = SparseMoE(8, 12, num_experts=4, k=2, glu=glu, act_layer="silu", dispatch_layout=layout).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    # moemix's own nodes say so; the combine's embedding_bag has no second derivative in torch either
    with pytest.raises(RuntimeError, match="first-order gradients only|derivative for .* is not implemented"):
        grad_x, = torch.autograd.grad(moe(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(grad_x.sum(), x)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("glu", [False, True])
def test_second_backward_with_retain_graph(layout, glu):
    moe = SparseMoE(8, 12, num_experts=4, k=2, glu=glu, dispatch_layout=layout).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    out = moe(x).sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("glu", [False, True])
def test_activation_checkpointing_and_save_on_cpu_give_the_same_gradients(layout, glu):
    torch.manual_seed(0)
    moe = SparseMoE(8, 12, num_experts=4, k=2, glu=glu, act_layer="silu", dispatch_layout=layout).double()
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(moe(x).sum(), [x, moe.experts.w1])
    checkpointed = torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False)
    torch.testing.assert_close(torch.autograd.grad(checkpointed.sum(), [x, moe.experts.w1]), want)
    with torch.autograd.graph.save_on_cpu():
        out = moe(x)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), [x, moe.experts.w1]), want)


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("score", ["softmax", "cosine"])
def test_float64_layer_passes_gradcheck(layout, score):
    torch.manual_seed(0)
    moe = SparseMoE(4, 6, num_experts=3, k=2, glu=True, act_layer="silu", score=score,
                    dispatch_layout=layout).double()
    assert moe.router(torch.randn(2, 4, dtype=torch.float64)).probs.dtype == torch.float64
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(moe, (x,))


def test_state_dict_round_trip():
    a = SparseMoE(16, 8, num_experts=4, shared_expert="gated", score="cosine")
    b = SparseMoE(16, 8, num_experts=4, shared_expert="gated", score="cosine")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(a(x), b(x))


def test_dropout_only_in_training():
    moe = SparseMoE(16, 8, num_experts=4, drop=0.5).eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe(x), moe(x))


def test_deepcopy_and_pickle_after_a_training_forward():
    import copy
    import pickle
    moe = SparseMoE(16, 8, num_experts=4)
    moe(torch.randn(5, 16))
    assert moe.aux_loss.requires_grad
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert clone.aux_loss is None
        torch.testing.assert_close(clone(torch.ones(2, 16)), moe(torch.ones(2, 16)))
