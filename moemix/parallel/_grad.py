"""Gradient scaling for the expert-parallel forward (the local expert parameters' share of the loss)."""
from __future__ import annotations

import torch


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``scale`` (no node at all for ``scale == 1``)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)
