"""Autograd helpers of the expert-parallel forward: the local expert parameters' gradient scale, and the
empty expert outputs of a rank that received no rows kept in the graph (the exchanges' backward is a collective)."""
from __future__ import annotations

from typing import Iterable

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


class _TieToGraph(torch.autograd.Function):
    """Identity on ``y``; zero gradients to ``anchors``."""

    @staticmethod
    def forward(ctx, y, *anchors):
        ctx.anchors = [(a.shape, a.dtype, a.device) for a in anchors]
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.anchors))


def tie_to_graph(y: torch.Tensor, anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``y`` made to require a gradient whenever one of ``anchors`` does; its backward gives those anchors
    zero gradients.

    Experts may return, for no rows, an output without a gradient (say, a loop that skips experts without
    rows). A rank that received no rows would then leave both exchanges out of its backward while the other
    ranks wait in them (they are collectives). Tied to its (empty) received rows and its expert parameters,
    its backward joins them, and the parameters get the zero gradient that the single-process layer gives
    experts without tokens.
    """
    needing = [a for a in anchors if a.requires_grad]
    if not torch.is_grad_enabled() or not needing:
        return y
    return _TieToGraph.apply(y, *needing)
