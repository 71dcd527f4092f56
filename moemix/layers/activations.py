"""Activation layers: resolution by name (timm ``get_act_layer`` style), closed-form gradients, and the
gated (GLU) activation ``act(gate) * up`` as one autograd node."""
from __future__ import annotations

from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["get_act_layer", "activation_backward", "apply_activation", "activation_input_grad", "gated_activation",
           "gated_activation_grad", "ACT_LAYERS"]

ACT_LAYERS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def get_act_layer(act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module]]) -> Callable[[], nn.Module]:
    """Return a zero-argument factory for the activation module."""
    if isinstance(act_layer, str):
        key = act_layer.lower()
        if key not in ACT_LAYERS:
            raise ValueError(f"act_layer must be one of {sorted(ACT_LAYERS)} or a module type, got {act_layer!r}")
        return ACT_LAYERS[key]
    if not callable(act_layer):
        raise ValueError(f"act_layer must be a name or an nn.Module type, got {act_layer!r}")
    return act_layer


def activation_backward(act: nn.Module) -> Optional[Callable[..., Tensor]]:
    """Closed-form backward ``(grad_output, input, output, out=None) -> grad_input`` of a built-in activation.

    With ``out`` the gradient is written into it (any strides, the input's shape) and returned. Exact
    types only (a subclass may change ``forward``); ``None`` for anything else, whose gradient callers
    take by autograd on a recomputed forward.
    """
    aten = torch.ops.aten
    kind = type(act)
    if kind is nn.Identity:
        return lambda grad, inp, output, out=None: grad if out is None else out.copy_(grad)
    kwargs = {}
    if kind is nn.SiLU:
        op, of_output, extra = aten.silu_backward, False, ()
    elif kind is nn.GELU:
        op, of_output, extra, kwargs = aten.gelu_backward, False, (), {"approximate": act.approximate}
    elif kind is nn.ReLU:
        op, of_output, extra = aten.threshold_backward, True, (0,)
    elif kind is nn.Tanh:
        op, of_output, extra = aten.tanh_backward, True, ()
    elif kind is nn.Sigmoid:
        op, of_output, extra = aten.sigmoid_backward, True, ()
    else:
        return None

    def backward(grad: Tensor, inp: Tensor, output: Tensor, out: Optional[Tensor] = None) -> Tensor:
        args = (grad, output if of_output else inp, *extra)
        return op(*args, **kwargs) if out is None else op.grad_input(*args, **kwargs, grad_input=out)

    return backward


def apply_activation(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` that never overwrites ``x`` (an activation with ``inplace=True`` gets a copy)."""
    return act(x.clone()) if getattr(act, "inplace", False) else act(x)


def activation_input_grad(act: nn.Module, grad: Tensor, inp: Tensor, output: Tensor,
                          out: Optional[Tensor] = None) -> Tensor:
    """Gradient of ``act`` at ``inp`` (``output = act(inp)``) for output gradient ``grad``.

    Closed form for the built-in activations (:func:`activation_backward`), else autograd on a
    recomputed ``act(inp)``. Written into ``out`` when given.
    """
    closed_form = activation_backward(act)
    if closed_form is not None:
        return closed_form(grad, inp, output, out=out)
    with torch.enable_grad():
        leaf = inp.detach().requires_grad_(True)
        (grad_inp,) = torch.autograd.grad(apply_activation(act, leaf), leaf, grad)
    return grad_inp if out is None else out.copy_(grad_inp)


def gated_activation_grad(act: nn.Module, grad: Tensor, h: Tensor, act_out: Tensor) -> Tensor:
    """Gradient of ``act(gate) * up`` w.r.t. ``h = [gate | up]`` (``[..., 2H]``) for output gradient ``grad``
    (``[..., H]``), given ``act_out = act(gate)``; both halves written into one new tensor."""
    hidden = h.shape[-1] // 2
    grad_h = torch.empty_like(h)
    torch.mul(grad, act_out, out=grad_h[..., hidden:])
    activation_input_grad(act, grad * h[..., hidden:], h[..., :hidden], act_out, out=grad_h[..., :hidden])
    return grad_h


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, act):
        hidden = h.shape[-1] // 2
        act_out = apply_activation(act, h[..., :hidden])
        ctx.save_for_backward(h, act_out)
        ctx.act = act
        return act_out * h[..., hidden:]

    @staticmethod
    def backward(ctx, grad):
        h, act_out = ctx.saved_tensors
        return gated_activation_grad(ctx.act, grad, h, act_out), None


def gated_activation(h: Tensor, act: nn.Module) -> Tensor:
    """GLU: ``act(gate) * up`` for ``h = [gate | up]`` ``[..., 2H] -> [..., H]`` (Shazeer 2020).

    One autograd node: the backward writes the gate and up gradients side by side into one ``[..., 2H]``
    tensor instead of two zero-padded slice gradients that are then added.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension (gate then up), got {h.shape[-1]}")
    return _GatedActivation.apply(h, act)
