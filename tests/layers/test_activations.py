import pytest
import torch
from torch import nn

from moemix.layers.activations import activation_backward, activation_forward, gated_activation


CLOSED_FORM = [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.Tanh(), nn.Sigmoid(), nn.Identity()]


def _autograd_case(act):
    """Input, output gradient, output and autograd's input gradient of ``act`` on a small float64 batch."""
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 5, dtype=torch.float64)
    out = act(x)
    (expected,) = torch.autograd.grad(out, x, grad)
    return x.detach(), grad, out.detach(), expected


@pytest.mark.parametrize("act", CLOSED_FORM)
def test_closed_form_backward_equals_autograd(act):
    x, grad, out, expected = _autograd_case(act)
    backward = activation_backward(act)
    assert backward is not None
    torch.testing.assert_close(backward(grad, x, out), expected)


def test_no_closed_form_for_other_modules():
    assert activation_backward(nn.Softplus()) is None


def test_subclass_is_not_trusted():
    class Shifted(nn.SiLU):
        def forward(self, x):
            return super().forward(x) + 1

    assert activation_backward(Shifted()) is None


@pytest.mark.parametrize("act", CLOSED_FORM)
def test_closed_form_backward_writes_into_a_strided_out(act):
    x, grad, out, expected = _autograd_case(act)
    target = torch.full((7, 12), float("nan"), dtype=torch.float64)
    result = activation_backward(act)(grad, x, out, out=target[:, 3:8])
    assert result.data_ptr() == target[:, 3:8].data_ptr()
    torch.testing.assert_close(target[:, 3:8], expected)
    assert torch.isnan(target[:, :3]).all() and torch.isnan(target[:, 8:]).all()


class _TimesSoftplus(nn.Module):
    """No closed form: its gradient comes from autograd on a recomputed forward."""

    def forward(self, x):
        return x * nn.functional.softplus(x)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(inplace=True),
                                 nn.SiLU(inplace=True), nn.Tanh(), nn.Sigmoid(), nn.Identity(), _TimesSoftplus()])
def test_gated_activation_equals_slices_by_autograd(act):
    h = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 4, 5, dtype=torch.float64)
    out = gated_activation(h, act)
    (got,) = torch.autograd.grad(out, h, grad)
    h_ref = h.detach().clone().requires_grad_(True)
    ref = act(h_ref[..., :5].clone()) * h_ref[..., 5:]
    (expected,) = torch.autograd.grad(ref, h_ref, grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(got, expected)
    assert torch.equal(h.detach(), h_ref.detach())  # an in-place activation never touched h


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


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(inplace=True), nn.Tanh(),
                                 nn.Sigmoid(), nn.Identity()])
def test_forward_into_a_strided_out_leaves_the_input_alone(act):
    x = torch.randn(7, 5, dtype=torch.float64)
    x[0, 0] = float("nan")
    before = x.clone()
    target = torch.full((7, 9), -1.0, dtype=torch.float64)
    activation_forward(act)(x, target[:, 2:7])
    torch.testing.assert_close(target[:, 2:7], act(x.clone()), equal_nan=True)
    torch.testing.assert_close(x, before, equal_nan=True)
    assert (target[:, :2] == -1).all() and (target[:, 7:] == -1).all()
    assert activation_forward(nn.Softplus()) is None


def test_an_activation_with_parameters_takes_the_layer_dtype_and_an_instance_is_copied():
    from moemix.layers import SparseMoE
    moe = SparseMoE(8, 12, num_experts=2, act_layer=nn.PReLU, dtype=torch.float64)
    assert moe.experts.act.weight.dtype == torch.float64
    assert moe(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64
    act = nn.GELU(approximate="tanh")
    a, b = SparseMoE(8, 12, num_experts=2, act_layer=act), SparseMoE(8, 12, num_experts=2, act_layer=act)
    assert a.experts.act is not act and b.experts.act is not a.experts.act
    assert a.experts.act.approximate == "tanh"
