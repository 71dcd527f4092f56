"""The ``grouped_mm`` dispatch layout: the sorted buffer through ``torch.nn.functional.grouped_mm``."""
import pytest
import torch
import torch.nn.functional as F

from moemix.layers import GroupedExperts, SparseMoE, plan_dispatch
from tests.layers._reference import reference_moe

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without F.grouped_mm")


def _output_and_grads(moe, x):
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = moe(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * target).sum().backward()
    return [out, x.grad] + [p.grad for p in moe.parameters()]


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("bias", [True, False, (True, False)])
@pytest.mark.parametrize("tokens", [0, 2, 50])
def test_grouped_mm_layout_matches_reference_and_sorted(glu, bias, tokens):
    torch.manual_seed(0)
    kw = dict(num_experts=6, k=2, glu=glu, bias=bias, act_layer="silu")
    moe = SparseMoE(16, 24, dispatch_layout="grouped_mm", **kw)
    sorted_moe = SparseMoE(16, 24, dispatch_layout="sorted", **kw)
    sorted_moe.load_state_dict(moe.state_dict())
    x = torch.randn(tokens, 16)  # 2 tokens x k=2 leave at least 2 of the 6 experts empty
    torch.testing.assert_close(moe(x), reference_moe(moe, x), atol=1e-5, rtol=1e-5)
    got, want = _output_and_grads(moe, x), _output_and_grads(sorted_moe, x)
    for g, w in zip(got, want):
        if w is None:  # no tokens: nothing reaches the experts
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    if tokens == 2:
        empty = moe.tokens_per_expert == 0
        assert empty.any() and not moe.experts.w1.grad[empty].any()  # unselected experts: zero gradient


def test_grouped_mm_layout_plan_has_slice_ends():
    indices = torch.tensor([[2, 0], [2, 3], [0, 2]])
    plan = plan_dispatch(indices, 5, layout="grouped_mm")
    assert plan.layout == "grouped_mm" and plan.capacity is None
    assert plan.offsets.dtype == torch.int32 and plan.offsets.tolist() == [2, 2, 5, 6, 6]


def test_grouped_mm_layout_refuses_drops_and_unsupported_dtypes():
    with pytest.raises(ValueError, match="dispatch_layout='grouped_mm' cannot hold"):
        SparseMoE(8, 8, num_experts=4, dispatch_layout="grouped_mm", capacity_factor=1.0)
    kept = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="layout='grouped_mm' cannot hold dropped assignments"):
        plan_dispatch(torch.tensor([[0, 1], [1, 0]]), 2, kept=kept, layout="grouped_mm")
    moe = SparseMoE(8, 8, num_experts=4, dispatch_layout="grouped_mm").double()
    with pytest.raises(ValueError, match="grouped_mm layout needs .*float32/bfloat16/float16.*got torch.float64"):
        moe(torch.randn(5, 8, dtype=torch.float64))


@pytest.mark.parametrize("dims, dtype, bad", [((10, 32, 8), torch.float32, r"weight \(4, 10, 32\)"),
                                              ((16, 30, 16), torch.float32, r"weight \(4, 16, 30\)"),
                                              ((16, 36, 16), torch.bfloat16, r"weight \(4, 16, 36\)")])
def test_grouped_mm_layout_names_unaligned_widths(dims, dtype, bad):
    in_features, hidden, out_features = dims
    moe = SparseMoE(in_features, hidden, out_features, num_experts=4, dispatch_layout="grouped_mm").to(dtype)
    with pytest.raises(ValueError, match=f"multiples of {128 // torch.finfo(dtype).bits}.*{bad}"):
        moe(torch.randn(5, in_features, dtype=dtype))


def test_grouped_mm_layout_first_order_only_and_retain_graph():
    moe = SparseMoE(8, 12, num_experts=4, k=2, glu=True, act_layer="silu", dispatch_layout="grouped_mm")
    x = torch.randn(6, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(moe(x).pow(2).sum(), x, create_graph=True)
    out = moe(x).sum()  # a stride-0 output gradient straight into the layer
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_grouped_mm_layout_bf16_autocast():
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=4, k=2, glu=True, act_layer="silu", dispatch_layout="grouped_mm")
    ref = SparseMoE(16, 32, num_experts=4, k=2, glu=True, act_layer="silu", dispatch_layout="sorted")
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = moe(x), ref(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert moe.experts.w1.grad.dtype == torch.float32 and torch.isfinite(moe.experts.w1.grad).all()
