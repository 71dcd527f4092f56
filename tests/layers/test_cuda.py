"""The same equivalences on a CUDA device (skipped where none is present)."""
import pytest
import torch

from moemix.layers import SparseMoE
from tests.layers._reference import reference_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("layout", ["sorted", "padded"])
@pytest.mark.parametrize("glu", [False, True])
def test_cuda_matches_reference_loop(layout, glu):
    torch.manual_seed(0)
    moe = SparseMoE(64, 96, num_experts=8, k=2, glu=glu, dispatch_layout=layout).cuda().double()
    x = torch.randn(300, 64, device="cuda", dtype=torch.float64, requires_grad=True)
    out = moe(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    ref = reference_moe(moe, x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, [x.grad] + [p.grad for p in moe.parameters()]):
        torch.testing.assert_close(got, want)


def test_cuda_bf16_autocast_and_capacity():
    moe = SparseMoE(64, 96, num_experts=8, k=2, capacity_factor=1.0).cuda()
    x = torch.randn(4, 100, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert moe.experts.w1.grad.dtype == torch.float32 and torch.isfinite(moe.experts.w1.grad).all()


def test_cuda_torch_compile_inductor():
    torch.manual_seed(0)
    moe = SparseMoE(64, 96, num_experts=8, k=2).cuda()
    x = torch.randn(256, 64, device="cuda")
    compiled = torch.compile(moe)
    torch.testing.assert_close(compiled(x), moe(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grouped_mm_layout_matches_sorted(dtype):
    torch.manual_seed(0)
    moe = SparseMoE(64, 96, num_experts=8, k=2, glu=True, act_layer="silu", dispatch_layout="grouped_mm")
    ref = SparseMoE(64, 96, num_experts=8, k=2, glu=True, act_layer="silu", dispatch_layout="sorted")
    ref.load_state_dict(moe.state_dict())
    moe, ref = moe.cuda().to(dtype), ref.cuda().to(dtype)
    x = torch.randn(300, 64, device="cuda", dtype=dtype)
    outs = []
    for layer in (moe, ref):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.float().square().sum().backward()
        outs.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for got, want in zip(*outs):
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_cuda_auto_takes_grouped_mm_in_half_precision_only():
    torch.manual_seed(0)
    moe = SparseMoE(64, 96, num_experts=8, k=2, glu=True, act_layer="silu").cuda()
    x = torch.randn(300, 64, device="cuda")
    plans = []
    original = moe.experts.forward_routed
    moe.experts.forward_routed = lambda tokens, weights, plan: plans.append(plan.layout) or original(tokens, weights,
                                                                                                    plan)
    moe(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)
    moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert plans == ["padded", "grouped_mm", "grouped_mm"]


def test_cuda_grouped_mm_empty_experts_and_no_tokens():
    """bfloat16 takes the grouped_mm layout: experts without rows get zero weight gradients whatever the kernel
    leaves in their slot, and a batch without tokens runs."""
    torch.manual_seed(0)
    moe = SparseMoE(64, 96, num_experts=16, k=2, glu=True, act_layer="silu").cuda().to(torch.bfloat16)
    x = torch.randn(3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # 6 assignments, 16 experts
    moe(x).float().sum().backward()
    empty = moe.tokens_per_expert == 0
    assert empty.sum() >= 10
    assert not moe.experts.w1.grad[empty].any() and not moe.experts.w2.grad[empty].any()
    assert torch.isfinite(moe.experts.w1.grad).all() and torch.isfinite(x.grad).all()
    y = moe(torch.randn(0, 64, device="cuda", dtype=torch.bfloat16))
    assert y.shape == (0, 64)
