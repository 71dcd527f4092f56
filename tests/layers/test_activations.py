import pytest
import torch
from torch import nn

from moemix.layers.activations import activation_backward


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.Tanh(),
                                 nn.Sigmoid(), nn.Identity()])
def test_closed_form_backward_equals_autograd(act):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 5, dtype=torch.float64)
    out = act(x)
    (expected,) = torch.autograd.grad(out, x, grad)
    backward = activation_backward(act)
    assert backward is not None
    torch.testing.assert_close(backward(grad, x.detach(), out.detach()), expected)


def test_no_closed_form_for_other_modules():
    assert activation_backward(nn.Softplus()) is None


def test_subclass_is_not_trusted():
    class Shifted(nn.SiLU):
        def forward(self, x):
            return super().forward(x) + 1

    assert activation_backward(Shifted()) is None


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.Tanh(),
                                 nn.Sigmoid(), nn.Identity()])
def test_closed_form_backward_writes_into_a_strided_out(act):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 5, dtype=torch.float64)
    out = act(x)
    (expected,) = torch.autograd.grad(out, x, grad)
    target = torch.full((7, 12), float("nan"), dtype=torch.float64)
    result = activation_backward(act)(grad, x.detach(), out.detach(), out=target[:, 3:8])
    assert result.data_ptr() == target[:, 3:8].data_ptr()
    torch.testing.assert_close(target[:, 3:8], expected)
    assert torch.isnan(target[:, :3]).all() and torch.isnan(target[:, 8:]).all()
