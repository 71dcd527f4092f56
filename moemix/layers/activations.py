"""Activation layers by name (timm ``get_act_layer`` style) and the gated activation ``act(gate) * up``."""
from __future__ import annotations

import copy
from typing import Callable, Type, Union

import torch
from torch import Tensor, nn

from moemix.layers.grouped_gemm import first_order

__all__ = ["get_act_layer", "gated_activation", "activate", "recomputable", "ACT_LAYERS"]

ACT_LAYERS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU,
              "swish": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
# Rows x hidden width recomputed at a time in the gated activation's backward (4 MiB of float32).
_CHUNK_ELEMENTS = 1 << 20


def get_act_layer(act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module], nn.Module]
                  ) -> Callable[[], nn.Module]:
    """A zero-argument factory for the activation: from a name (``ACT_LAYERS``), a module class or factory,
    or a module instance (each call gives a deep copy, so layers never share it)."""
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


def _apply(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` that never overwrites ``x`` (an activation with ``inplace=True`` gets a copy)."""
    return act(x.clone()) if getattr(act, "inplace", False) else act(x)


def activate(act: nn.Module, h: Tensor, glu: bool) -> Tensor:
    """``act(h)``, or for GLU ``act(gate) * up`` with ``h = [gate | up]``, never overwriting ``h``."""
    if not glu:
        return _apply(act, h)
    hidden = h.shape[-1] // 2
    return _apply(act, h[..., :hidden]) * h[..., hidden:]


def recomputable(act: nn.Module) -> bool:
    """Parameter-free, deterministic torch activations, which a backward may recompute."""
    return (type(act).__module__ == "torch.nn.modules.activation" and not isinstance(act, (nn.RReLU, nn.PReLU))
            or isinstance(act, nn.Identity))


class _GatedActivation(torch.autograd.Function):
    """Saves ``h`` alone; the backward recomputes ``act(gate)`` chunk by chunk and writes the gate and up
    gradients side by side into one ``[R, 2H]`` tensor."""

    @staticmethod
    def forward(ctx, h, act):
        hidden = h.shape[-1] // 2
        ctx.save_for_backward(h)
        ctx.act = act
        return _apply(act, h[:, :hidden]) * h[:, hidden:]

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        hidden = h.shape[-1] // 2
        grad_h = torch.empty_like(h)
        step = max(1, _CHUNK_ELEMENTS // max(hidden, 1))
        for start in range(0, h.shape[0], step):
            rows = slice(start, start + step)
            with torch.enable_grad():
                gate = h[rows, :hidden].detach().requires_grad_()
                act_gate = _apply(ctx.act, gate)
            torch.mul(grad[rows], act_gate.detach(), out=grad_h[rows, hidden:])
            (grad_h[rows, :hidden],) = torch.autograd.grad(act_gate, gate, grad[rows] * h[rows, hidden:])
        return grad_h, None


def gated_activation(h: Tensor, act: nn.Module) -> Tensor:
    """GLU: ``act(gate) * up`` for ``h = [gate | up]`` ``[R, 2H] -> [R, H]`` (Shazeer 2020).

    For parameter-free torch activations it keeps only ``h`` for the backward (stock autograd would also
    keep ``act(gate)`` and add two zero-padded ``[R, 2H]`` slice gradients); any other activation runs
    through stock autograd.
    """
    if h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension (gate then up), got {h.shape[-1]}")
    if h.dim() == 2 and recomputable(act):
        return _GatedActivation.apply(h, act)
    return activate(act, h, glu=True)
