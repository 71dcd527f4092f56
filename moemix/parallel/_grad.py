"""Row permutation and gradient scaling helpers for the expert-parallel forward."""
from __future__ import annotations

import dataclasses
from typing import List

import torch

from moemix.layers.dispatch import DispatchPlan


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
    """``x`` unchanged, its gradient multiplied by ``scale`` (a no-op node for ``scale == 1``)."""
    return x if scale == 1.0 else _ScaleGrad.apply(x, scale)


def regroup_plan(recv_counts: List[List[int]], device: torch.device) -> DispatchPlan:
    """Plan that reorders received rows from (source rank, local expert) to (local expert, source rank).

    ``recv_counts[r][l]`` rows arrive from rank ``r`` for local expert ``l``, in rank-major blocks. The
    plan is a ``k = 1`` :class:`DispatchPlan`, so :func:`~moemix.layers.dispatch.dispatch_tokens` applies
    it as a row gather whose backward is the inverse gather; :func:`inverse_plan` undoes it.
    """
    num_local = len(recv_counts[0])
    flat = [c for row in recv_counts for c in row]
    rows = sum(flat)
    local_ids = torch.arange(num_local, device=device).repeat(len(recv_counts))
    local_ids = torch.repeat_interleave(local_ids, torch.tensor(flat, device=device), output_size=rows)
    order = torch.sort(local_ids, stable=True).indices  # received row held by each regrouped row
    slot = torch.empty_like(order)  # regrouped row of each received row
    slot[order] = torch.arange(rows, device=device)
    counts = [sum(row[l] for row in recv_counts) for l in range(num_local)]
    return DispatchPlan(num_tokens=rows, k=1, slot=slot, row_token=order, order=order, counts=counts,
                        tokens_per_expert=torch.tensor(counts, device=device))


def inverse_plan(plan: DispatchPlan) -> DispatchPlan:
    """The ``k = 1`` plan that puts rows permuted by ``plan`` back in their original order."""
    return dataclasses.replace(plan, slot=plan.row_token, row_token=plan.slot, order=plan.slot)
