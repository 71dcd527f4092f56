"""Activations by name and the gated activation act(gate) * up."""
import pytest
import torch
from torch import nn

from moemix.layers import get_act_layer
from moemix.layers.activations import gated_activation, recomputable


class _TimesSoftplus(nn.Module):
    """A user activation: not recomputed, stock autograd."""

    def forward(self, x):
        return x * nn.functional.softplus(x)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(inplace=True),
                                 nn.SiLU(inplace=True), nn.Tanh(), nn.Sigmoid(), nn.Identity(), nn.Softplus(),
                                 _TimesSoftplus()])
def test_gated_activation_equals_slices_by_autograd(act, monkeypatch):
    import moemix.layers.activations as activations
    monkeypatch.setattr(activations, "_CHUNK_ELEMENTS", 10)  # several chunks in the backward
    h = torch.randn(12, 10, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(12, 5, dtype=torch.float64)
    out = gated_activation(h, act)
    (got,) = torch.autograd.grad(out, h, grad)
    h_ref = h.detach().clone().requires_grad_(True)
    ref = act(h_ref[..., :5].clone()) * h_ref[..., 5:]
    (expected,) = torch.autograd.grad(ref, h_ref, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, expected)
    assert torch.equal(h.detach(), h_ref.detach())  # an in-place activation never touched h


def test_only_parameter_free_torch_activations_are_recomputed():
    class Shifted(nn.SiLU):
        def forward(self, x):
            return super().forward(x) + 1

    assert recomputable(nn.SiLU()) and recomputable(nn.GELU()) and recomputable(nn.Identity())
    assert not recomputable(nn.PReLU()) and not recomputable(nn.RReLU())  # parameters, randomness
    assert not recomputable(Shifted()) and not recomputable(_TimesSoftplus())


def test_gated_activation_needs_an_even_width():
    with pytest.raises(ValueError, match="even last dimension"):
        gated_activation(torch.randn(2, 5), nn.SiLU())


def test_gated_activation_trains_the_parameters_of_its_activation():
    act = nn.PReLU(init=0.3).double()
    h = torch.randn(8, 6, dtype=torch.float64)
    gated_activation(h, act).sum().backward()
    expected = torch.autograd.grad((nn.functional.prelu(h[:, :3], act.weight) * h[:, 3:]).sum(), act.weight)[0]
    torch.testing.assert_close(act.weight.grad, expected)


def test_gated_activation_refuses_double_backward_clearly():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="GatedActivation has first-order gradients only"):
        torch.autograd.grad(gated_activation(h, nn.SiLU()).pow(2).sum(), h, create_graph=True)


def test_get_act_layer_by_name_type_or_instance():
    assert isinstance(get_act_layer("swish")(), nn.SiLU)
    assert get_act_layer("gelu_tanh")().approximate == "tanh"
    assert isinstance(get_act_layer(nn.ReLU)(), nn.ReLU)
    act = nn.GELU(approximate="tanh")
    assert get_act_layer(act)() is not act and get_act_layer(act)().approximate == "tanh"
    with pytest.raises(ValueError, match="act_layer must be one of"):
        get_act_layer("mish!")


def test_an_activation_with_parameters_takes_the_layer_dtype_and_an_instance_is_copied():
    from moemix.layers import SparseMoE
    moe = SparseMoE(8, 12, num_experts=2, act_layer=nn.PReLU, dtype=torch.float64)
    assert moe.experts.act.weight.dtype == torch.float64
    assert moe(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64
    act = nn.GELU(approximate="tanh")
    a, b = SparseMoE(8, 12, num_experts=2, act_layer=act), SparseMoE(8, 12, num_experts=2, act_layer=act)
    assert a.experts.act is not act and b.experts.act is not a.experts.act
    assert a.experts.act.approximate == "tanh"
