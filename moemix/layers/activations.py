"""Resolve activation layers given as a type, a factory or a name (timm ``get_act_layer`` style)."""
from __future__ import annotations

from typing import Callable, Type, Union

from torch import nn

__all__ = ["get_act_layer", "ACT_LAYERS"]

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
