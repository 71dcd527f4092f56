"""Dropless token dispatch: the one hot path every moemix MoE layer shares.

The T*k (token, expert) assignments are sorted by expert id once; every expert then reads a
contiguous slice of the permuted tokens (megablocks dMoE / scattermoe style). All data movement is
expressed as row gathers whose backward is again a gather by the inverse permutation, so neither the
forward nor the backward pass uses a serial scatter-add, and there is one host sync (the per-expert
counts) per layer call.

    x [T, D] --dispatch_tokens--> x_sorted [N, D] --grouped_matmul(...)--> y_sorted [N, D']
    y_sorted --combine_tokens(weights)--> y [T, D']        with N = T * k

Dropped assignments (capacity mode) are sorted into a trailing bucket that no expert reads; their
output rows are zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch_tokens", "combine_tokens", "grouped_matmul"]


@dataclass
class DispatchPlan:
    """Sorted order of the ``N = T * k`` assignments.

    Attributes:
        num_tokens: ``T``.
        k: experts per token.
        order: ``[N]`` flat assignment id (``t * k + j``) at each sorted position.
        inverse: ``[N]`` sorted position of each flat assignment id (``order[inverse] == arange(N)``).
        counts: per-expert row counts (host ints, length ``E``); dropped rows follow the last expert.
        tokens_per_expert: the same counts as a ``[E]`` int64 tensor on the input's device.
        num_dropped: rows in the trailing dropped bucket.
    """

    num_tokens: int
    k: int
    order: torch.Tensor
    inverse: torch.Tensor
    counts: List[int]
    tokens_per_expert: torch.Tensor
    num_dropped: int = 0

    @property
    def token_index(self) -> torch.Tensor:
        """``[N]`` source token of each sorted row."""
        return torch.div(self.order, self.k, rounding_mode="floor")


def plan_dispatch(indices: torch.Tensor, num_experts: int, kept: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Sort ``[T, k]`` expert ids into a :class:`DispatchPlan`; ``kept`` marks assignments to keep."""
    num_tokens, k = indices.shape
    flat = indices.reshape(-1)
    if kept is not None:
        flat = torch.where(kept.reshape(-1), flat, torch.full_like(flat, num_experts))
    order = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    bins = torch.bincount(flat, minlength=num_experts + 1)
    counts = bins.tolist()  # the one host sync: slice sizes are needed on the host
    return DispatchPlan(num_tokens=num_tokens, k=k, order=order, inverse=inverse, counts=counts[:num_experts],
                        tokens_per_expert=bins[:num_experts], num_dropped=counts[num_experts])


class _DispatchTokens(torch.autograd.Function):
    """``x [T, D] -> x[token_index] [N, D]``; backward sums the k copies via the inverse permutation."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad_x = grad.index_select(0, inverse).view(inverse.numel() // ctx.k, ctx.k, grad.shape[-1]).sum(1)
        return grad_x, None, None, None


class _CombineTokens(torch.autograd.Function):
    """``y_sorted [N, D], w [T, k] -> sum_j w[t, j] * y[t, j] [T, D]`` with gathers only."""

    @staticmethod
    def forward(ctx, y_sorted, weights, order, inverse):
        num_tokens, k = weights.shape
        y = y_sorted.index_select(0, inverse).view(num_tokens, k, y_sorted.shape[-1])
        w = weights.to(y.dtype)
        ctx.save_for_backward(y, w, order)
        ctx.weights_dtype = weights.dtype
        return torch.bmm(w.unsqueeze(1), y).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, w, order = ctx.saved_tensors
        grad = grad.to(y.dtype)
        grad_y_sorted = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (w.unsqueeze(-1) * grad.unsqueeze(1)).view(-1, grad.shape[-1])
            grad_y_sorted = grad_y.index_select(0, order)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(y, grad.unsqueeze(-1)).squeeze(-1).to(ctx.weights_dtype)
        return grad_y_sorted, grad_w, None, None


def dispatch_tokens(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Permute tokens ``[T, D]`` into expert-sorted rows ``[T * k, D]``."""
    return _DispatchTokens.apply(x, plan.order, plan.inverse, plan.k)


def combine_tokens(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted sum of each token's ``k`` expert outputs: ``[T * k, D], [T, k] -> [T, D]``."""
    return _CombineTokens.apply(y_sorted, weights, plan.order, plan.inverse)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _GroupedMatmul(torch.autograd.Function):
    """Per-expert ``x_e @ w[e] + b[e]`` over contiguous row slices, one output buffer.

    Gradients for the stacked ``w [E, in, out]`` are written slice by slice into one buffer, so no
    per-expert full-size gradient is ever materialised.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        rows = sum(counts)
        out = x.new_empty(x.shape[0], weight.shape[-1])
        if rows < x.shape[0]:
            out[rows:].zero_()
        start = 0
        for e, n in enumerate(counts):
            if n:
                stop = start + n
                if bias is None:
                    torch.mm(x[start:stop], weight[e], out=out[start:stop])
                else:
                    torch.addmm(bias[e], x[start:stop], weight[e], out=out[start:stop])
                start = stop
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = None
        if need_x:  # rows past sum(counts) (dropped) get zero gradient
            grad_x = x.new_zeros(x.shape) if sum(counts) < x.shape[0] else x.new_empty(x.shape)
        grad_w = weight.new_empty(weight.shape) if need_w else None
        grad_b = grad.new_empty(weight.shape[0], weight.shape[-1]) if need_b and ctx.has_bias else None
        start = 0
        for e, n in enumerate(counts):
            stop = start + n
            if n == 0:
                if grad_w is not None:
                    grad_w[e].zero_()
                if grad_b is not None:
                    grad_b[e].zero_()
                continue
            g = grad[start:stop]
            if grad_x is not None:
                torch.mm(g, weight[e].t(), out=grad_x[start:stop])
            if grad_w is not None:
                torch.mm(x[start:stop].t(), g, out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
            start = stop
        return grad_x, grad_w, grad_b, None


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: List[int],
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows.

    Args:
        x: ``[N, in]`` rows sorted by expert; rows past ``sum(counts)`` are outputs of zero.
        weight: ``[E, in, out]`` stacked expert weights.
        counts: rows of each expert (host ints, length ``E``).
        bias: optional ``[E, out]``.

    Returns:
        ``[N, out]``. Runs in the autocast dtype when autocast is on.
    """
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _GroupedMatmul.apply(x.contiguous(), weight, bias, counts)
