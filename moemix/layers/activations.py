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


def activation_backward(act: nn.Module) -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Closed-form backward ``(grad_output, input, output) -> grad_input`` of a built-in activation.

    Exact types only (a subclass may change ``forward``); ``None`` for anything else, whose gradient
    callers take by autograd on a recomputed forward.
    """
    kind = type(act)
    if kind is nn.SiLU:
        return lambda grad, inp, out: torch.ops.aten.silu_backward(grad, inp)
    if kind is nn.GELU:
        approximate = act.approximate
        return lambda grad, inp, out: torch.ops.aten.gelu_backward(grad, inp, approximate=approximate)
    if kind is nn.ReLU:
        return lambda grad, inp, out: torch.ops.aten.threshold_backward(grad, out, 0)
    if kind is nn.Tanh:
        return lambda grad, inp, out: torch.ops.aten.tanh_backward(grad, out)
    if kind is nn.Sigmoid:
        return lambda grad, inp, out: torch.ops.aten.sigmoid_backward(grad, out)
    if kind is nn.Identity:
        return lambda grad, inp, out: grad
    return None
