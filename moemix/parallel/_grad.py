"""Row permutation and gradient scaling for the expert-parallel forward.

Kept independent of :class:`~moemix.layers.dispatch.DispatchPlan` internals: the regroup is a plain
permutation of rows, not a routing step.
"""
from __future__ import annotations

from typing import List, Tuple

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


class _PermuteRows(torch.autograd.Function):
    """``out[i] = x[index[i]]`` for a permutation ``index``; backward is the gather by ``inverse``."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [M, ...]`` in the order ``index [M]`` (a permutation with inverse ``inverse``)."""
    return _PermuteRows.apply(x, index, inverse)


def regroup_permutation(recv_counts: List[List[int]], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Permutation from (source rank, local expert) order to (local expert, source rank) order.

    ``recv_counts[r][l]`` rows arrive from rank ``r`` for local expert ``l``, in rank-major blocks.
    Returns ``(index, inverse)``: ``x[index]`` is grouped by local expert (stable in source rank), and
    ``y[inverse]`` puts rows of that grouping back in arrival order.
    """
    num_local = len(recv_counts[0])
    flat = [c for row in recv_counts for c in row]
    rows = sum(flat)
    local_ids = torch.arange(num_local, device=device).repeat(len(recv_counts))
    local_ids = torch.repeat_interleave(local_ids, torch.tensor(flat, device=device), output_size=rows)
    index = torch.sort(local_ids, stable=True).indices
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(rows, device=device)
    return index, inverse
