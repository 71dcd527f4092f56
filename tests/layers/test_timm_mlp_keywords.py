"""SparseMoE takes timm ``Mlp``'s per-layer ``bias`` and ``drop`` pairs and means the same by them."""
import pytest
import torch

from moemix.layers import SparseMoE

timm_layers = pytest.importorskip("timm.layers")


@pytest.mark.parametrize("bias", [(True, False), (False, True)])
@pytest.mark.parametrize("layout", ["sorted", "padded", "grouped_mm"])
def test_bias_pair_matches_timm_mlp(bias, layout):
    torch.manual_seed(0)
    mlp = timm_layers.Mlp(8, 16, bias=bias)
    moe = SparseMoE(8, 16, bias=bias, num_experts=3, k=2, dispatch_layout=layout)
    assert (moe.experts.b1 is not None, moe.experts.b2 is not None) == bias
    moe.experts.load_dense(mlp.fc1, mlp.fc2)
    x = torch.randn(20, 8)
    torch.testing.assert_close(moe(x), mlp(x))  # every expert is the Mlp and the weights sum to 1


@pytest.mark.parametrize("drop, p1, p2", [((0.5, 0.0), 0.5, 0.0), ((0.0, 0.5), 0.0, 0.5), (0.25, 0.25, 0.25)])
def test_drop_pair_sets_each_dropout(drop, p1, p2):
    moe = SparseMoE(8, 16, drop=drop, num_experts=3, k=2, dispatch_layout="sorted")
    assert (moe.experts.drop1.p, moe.experts.drop2.p) == (p1, p2)
    x = torch.randn(50, 8)
    moe.eval()
    clean = moe(x)
    moe.train()
    assert not torch.allclose(moe(x), clean)  # dropout after either layer acts in training


@pytest.mark.parametrize("bias", [(True, False), (False, True)])
@pytest.mark.parametrize("glu", [False, True])
def test_bias_pair_gradients_agree_across_layouts(bias, glu):
    torch.manual_seed(0)
    ref = SparseMoE(8, 16, bias=bias, glu=glu, num_experts=3, k=2, dispatch_layout="sorted").double()
    x = torch.randn(30, 8, dtype=torch.float64)
    grads = {}
    for layout in ("sorted", "padded"):
        ref.dispatch_layout = layout
        ref.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        ref(xi).square().sum().backward()
        grads[layout] = [xi.grad] + [p.grad for p in ref.parameters()]
    for layout in ("padded",):
        for got, want in zip(grads[layout], grads["sorted"]):
            torch.testing.assert_close(got, want)
