"""Resolve activation layers given as a type, a factory or a name (timm ``get_act_layer`` style)."""
from __future__ import annotations

from typing import Callable, Optional, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["get_act_layer", "activation_backward", "ACT_LAYERS"]

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
