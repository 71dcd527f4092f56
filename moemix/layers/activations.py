"""Activation layers: resolution by name (timm ``get_act_layer`` style), closed-form gradients, and the
gated (GLU) activation ``act(gate) * up`` as one autograd node."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

from moemix.layers._first_order import first_order_backward
from moemix.layers.recycled_buffers import RecycledPool, take_or_empty

__all__ = ["get_act_layer", "activation_forward", "activation_backward", "apply_activation", "gated_activation", "gated_activation_grad",
           "ACT_LAYERS"]

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


def get_act_layer(act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module], nn.Module]
                  ) -> Callable[[], nn.Module]:
    """Return a zero-argument factory for the activation module: from a name (``ACT_LAYERS``), a module
    class or factory, or a module instance (each call gives a deep copy, so layers never share it)."""
    if isinstance(act_layer, nn.Module):
        return lambda: copy.deepcopy(act_layer)
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
    types only (a subclass may change ``forward``); ``None`` for anything else, which callers leave to
    plain autograd.
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


def activation_forward(act: nn.Module) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """``(input, out) -> out``: the built-in activation written into ``out`` (any strides), never into
    ``input``; same types as :func:`activation_backward`, ``None`` for anything else."""
    aten = torch.ops.aten
    kind = type(act)
    if kind is nn.SiLU:
        return lambda x, out: aten.silu.out(x, out=out)
    if kind is nn.GELU:
        approx = act.approximate
        return lambda x, out: aten.gelu.out(x, approximate=approx, out=out)
    if kind is nn.ReLU:
        return lambda x, out: torch.clamp_min(x, 0, out=out)
    if kind is nn.Tanh:
        return lambda x, out: torch.tanh(x, out=out)
    if kind is nn.Sigmoid:
        return lambda x, out: torch.sigmoid(x, out=out)
    if kind is nn.Identity:
        return lambda x, out: out.copy_(x)
    return None


def apply_activation(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` that never overwrites ``x`` (an activation with ``inplace=True`` gets a copy)."""
    return act(x.clone()) if getattr(act, "inplace", False) else act(x)


def gated_activation_grad(grad: Tensor, h: Tensor, act_out: Tensor, act_backward: Callable[..., Tensor],
                          out: Optional[Tensor] = None) -> Tensor:
    """Gradient of ``act(gate) * up`` w.r.t. ``h = [gate | up]`` ``[..., 2H]`` for output gradient ``grad``
    ``[..., H]``, given ``act_out = act(gate)`` and the closed-form ``act_backward``
    (:func:`activation_backward`); both halves written side by side into ``out`` (contiguous, ``h``'s
    shape) or a new tensor."""
    hidden = h.shape[-1] // 2
    grad_h = torch.empty_like(h) if out is None else out
    grad_gate = torch.mul(grad, h[..., hidden:], out=grad_h[..., :hidden])  # d/d act(gate), then in place
    act_backward(grad_gate, h[..., :hidden], act_out, out=grad_gate)
    torch.mul(grad, act_out, out=grad_h[..., hidden:])
    return grad_h


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, act, act_backward, pool):
        hidden = h.shape[-1] // 2
        gate = h[..., :hidden]
        act_out = activation_forward(act)(gate, take_or_empty(pool, h, gate.shape))
        ctx.save_for_backward(h, act_out)
        ctx.act_backward, ctx.pool = act_backward, pool
        return torch.mul(act_out, h[..., hidden:], out=take_or_empty(pool, act_out))

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        h, act_out = ctx.saved_tensors
        grad_h = gated_activation_grad(grad, h, act_out, ctx.act_backward, out=take_or_empty(ctx.pool, h))
        return grad_h, None, None, None


def gated_activation(h: Tensor, act: nn.Module, pool: Optional[RecycledPool] = None) -> Tensor:
    """GLU: ``act(gate) * up`` for ``h = [gate | up]`` ``[..., 2H] -> [..., H]`` (Shazeer 2020).

    For the built-in activations (:func:`activation_backward`) this is one autograd node whose backward
    writes the gate and up gradients side by side into one ``[..., 2H]`` tensor (instead of two
    zero-padded slice gradients that are then added); it has first-order gradients only (``create_graph=True`` raises).
    ``pool`` (:class:`~moemix.layers.recycled_buffers.RecycledPool`) recycles the memory of ``act(gate)``,
    the output and the gradient across steps. Any other activation (with parameters, random, or custom)
    goes through plain autograd.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension (gate then up), got {h.shape[-1]}")
    act_backward = activation_backward(act)
    if act_backward is None:
        hidden = h.shape[-1] // 2
        return apply_activation(act, h[..., :hidden]) * h[..., hidden:]
    return _GatedActivation.apply(h, act, act_backward, pool)
