"""The sorted layout of MLP experts on CPU as one autograd node that loops over the experts.

For expert ``e`` with buffer rows ``r`` (tokens ``t_r``, router weights ``w_r``)::

    h = x[t_r] @ W1_e + b1_e      a = act(h)  (GLU: act(gate) * up)      y[t_r] += w_r * (a @ W2_e + b2_e)

Every temporary is one expert's rows, so it comes from the allocator's heap instead of fresh pages (on CPU
a step of large ``[N, D]`` buffers spends much of its time faulting their pages in), and only each
expert's ``h`` is kept for the backward: no expert buffer, no per-row outputs. The backward recomputes
``x[t_r]`` and ``act`` per expert, the activation's gradient by autograd (any parameter-free torch
activation, :func:`~moemix.layers.activations.recomputable`). Runs in the autocast dtype when autocast is on.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from moemix.layers.activations import activate
from moemix.layers.dispatch import DispatchPlan
from moemix.layers.grouped_gemm import autocast_dtype, first_order

__all__ = ["expert_loop"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x @ weight if bias is None else torch.addmm(bias, x, weight)


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_weight, row_token, counts, act, glu, w1, b1, w2, b2):
        out = x.new_zeros(x.shape[0], w2.shape[-1])
        saved_h: List[torch.Tensor] = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            start += n
            h = _linear(x.index_select(0, row_token[rows]), w1[e], None if b1 is None else b1[e])
            y = _linear(activate(act, h, glu), w2[e], None if b2 is None else b2[e])
            out.index_add_(0, row_token[rows], y.mul_(row_weight[rows, None]))
            saved_h.append(h)
        ctx.save_for_backward(x, row_weight, row_token, w1, b1, w2, b2, *saved_h)
        ctx.counts, ctx.act, ctx.glu = counts, act, glu
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        x, row_weight, row_token, w1, b1, w2, b2, *saved_h = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.zeros_like(x)
        grad_row_weight = torch.zeros_like(row_weight)
        gw1, gb1, gw2, gb2 = grads = [torch.empty_like(p) if p is not None else None for p in (w1, b1, w2, b2)]
        start, saved = 0, iter(saved_h)
        for e, n in enumerate(ctx.counts):
            if n == 0:  # an expert without rows gets zero gradients
                for grad in (g for g in grads if g is not None):
                    grad[e].zero_()
                continue
            rows = slice(start, start + n)
            start += n
            tokens, w = row_token[rows], row_weight[rows, None]
            h = next(saved)
            with torch.enable_grad():
                h_leaf = h.detach().requires_grad_()
                a = activate(ctx.act, h_leaf, ctx.glu)
            g = grad_out.index_select(0, tokens)
            u = g @ w2[e].t()  # gradient of the expert output's projection on g, per activation
            grad_row_weight[rows] = (a.detach() * u).sum(-1) + (0 if b2 is None else g @ b2[e])
            gw = g.mul_(w)
            torch.mm(a.detach().t(), gw, out=gw2[e])
            if gb2 is not None:
                torch.sum(gw, 0, out=gb2[e])
            (grad_h,) = torch.autograd.grad(a, h_leaf, u.mul_(w))
            torch.mm(x.index_select(0, tokens).t(), grad_h, out=gw1[e])
            if gb1 is not None:
                torch.sum(grad_h, 0, out=gb1[e])
            grad_x.index_add_(0, tokens, grad_h @ w1[e].t())
        return grad_x, grad_row_weight, None, None, None, None, gw1, gb1, gw2, gb2


def expert_loop(x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan, act: nn.Module, glu: bool,
                w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor]
                ) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * MLP_{e(t, j)}(x[t])`` for tokens ``x [T, D]``, ``weights [T, k]`` and a
    sorted-layout ``plan``; ``w1 [E, D, H']``, ``b1 [E, H']``, ``w2 [E, H, D']``, ``b2 [E, D']`` as
    :class:`~moemix.layers.GroupedExperts` stores them. Dropped assignments add nothing."""
    rows = plan.num_rows
    # The flat assignment each buffer row holds (dropped assignments point one past the buffer).
    assignment = x.new_empty(rows + 1, dtype=torch.long).index_copy_(
        0, plan.slot.reshape(-1), torch.arange(plan.slot.numel(), device=x.device))[:rows]
    dtype = autocast_dtype(x.device.type) or x.dtype
    row_weight = weights.reshape(-1).index_select(0, assignment).to(dtype)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    b1, b2 = (b if b is None else b.to(dtype) for b in (b1, b2))
    with torch.autocast(x.device.type, enabled=False):
        return _ExpertLoop.apply(x.to(dtype), row_weight, plan.row_token, plan.counts, act, glu, w1, b1, w2, b2)
