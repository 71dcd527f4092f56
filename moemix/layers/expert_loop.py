"""Fused per-expert MLP loop: gather, GEMM, activation, GEMM, weighted scatter in one autograd node.

For each expert ``e`` with assignments ``r_e`` (tokens ``t_e = r_e // k``, router weights ``w_e``):

    h_e = x[t_e] @ W1_e + b1_e            a_e = act(h_e)  (GLU: act(gate) * up)
    y[t_e] += w_e * (a_e @ W2_e + b2_e)

Only ``h_e`` is saved (gate and up separately for GLU, each from its own GEMM on a column block of
``W1_e`` so both are contiguous). The backward never builds the ``[T*k, D]`` expert outputs: with
``u_e = g_e @ W2_e^T`` (``g_e = grad_y[t_e]``) the router-weight gradient is
``a_e . u_e + g_e . b2_e`` and the activation gradient ``w_e * u_e``. Every temporary is per expert,
so on CPU it comes from the allocator's recycled heap instead of freshly faulted pages, which is what
makes this the fastest strategy for large batches of coarse experts (see ``docs/results/moe_layer.md``).
Any activation module works: its derivative is taken by autograd on the recomputed ``act(h_e)``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["fused_expert_mlp"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, grad_w: torch.Tensor, grad_b: Optional[torch.Tensor]) -> None:
    torch.mm(x.t(), grad, out=grad_w)
    if grad_b is not None:
        torch.sum(grad, dim=0, out=grad_b)


class _FusedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, b1, w2, b2, order, counts, k, act, glu):
        out = x.new_zeros(x.shape[0], w2.shape[-1])
        hidden = w2.shape[1]
        tokens_sorted = torch.div(order, k, rounding_mode="floor")
        weights_sorted = weights.reshape(-1).index_select(0, order).to(x.dtype)
        saved: List[Optional[tuple]] = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                saved.append(None)
                continue
            stop = start + n
            t_e = tokens_sorted[start:stop]
            x_e = x.index_select(0, t_e)
            if glu:  # two GEMMs on the gate / up column blocks keep both outputs contiguous
                gate = _linear(x_e, w1[e, :, :hidden], b1[e, :hidden] if b1 is not None else None)
                up = _linear(x_e, w1[e, :, hidden:], b1[e, hidden:] if b1 is not None else None)
                a_e = act(gate) * up
                saved.append((gate, up))
            else:
                h_e = _linear(x_e, w1[e], b1[e] if b1 is not None else None)
                a_e = act(h_e)
                saved.append((h_e,))
            y_e = _linear(a_e, w2[e], b2[e] if b2 is not None else None)
            y_e.mul_(weights_sorted[start:stop].unsqueeze(-1))
            out.index_add_(0, t_e, y_e)
            start = stop
        ctx.save_for_backward(x, weights, w1, b1, w2, b2, order, tokens_sorted, weights_sorted)
        ctx.saved_hidden, ctx.counts, ctx.act, ctx.glu = saved, counts, act, glu
        ctx.weights_dtype = weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, w1, b1, w2, b2, order, tokens_sorted, weights_sorted = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        act, glu, hidden = ctx.act, ctx.glu, w2.shape[1]
        grad_x = torch.zeros_like(x) if need_x else None
        grad_weights_sorted = torch.zeros_like(weights_sorted)
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        grad_b1 = torch.empty_like(b1) if b1 is not None else None
        grad_b2 = torch.empty_like(b2) if b2 is not None else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (grad_w1, grad_w2, grad_b1, grad_b2):
                    if grad is not None:
                        grad[e].zero_()
                continue
            stop = start + n
            t_e, w_e = tokens_sorted[start:stop], weights_sorted[start:stop].unsqueeze(-1)
            g_e = grad_out.index_select(0, t_e)
            u_e = torch.mm(g_e, w2[e].t())  # gradient of (expert output . g) w.r.t. the activation
            with torch.enable_grad():  # recompute the activation to differentiate any act module
                pre = ctx.saved_hidden[e][0].detach().requires_grad_(True)
                act_out = act(pre)
            a_e = act_out.detach() * ctx.saved_hidden[e][1] if glu else act_out.detach()
            if need_weights:
                dots = (a_e * u_e).sum(-1)
                grad_weights_sorted[start:stop] = dots + g_e @ b2[e] if b2 is not None else dots
            g_e.mul_(w_e)
            _weight_grad(a_e, g_e, grad_w2[e], grad_b2[e] if grad_b2 is not None else None)
            u_e.mul_(w_e)
            x_e = x.index_select(0, t_e)
            if glu:
                up = ctx.saved_hidden[e][1]
                (grad_gate,) = torch.autograd.grad(act_out, pre, u_e * up)
                grad_up = u_e.mul_(act_out.detach())
                for grad_h, cols in ((grad_gate, slice(None, hidden)), (grad_up, slice(hidden, None))):
                    _weight_grad(x_e, grad_h, grad_w1[e, :, cols], grad_b1[e, cols] if grad_b1 is not None else None)
                if need_x:
                    grad_x_e = torch.mm(grad_gate, w1[e, :, :hidden].t())
                    grad_x.index_add_(0, t_e, torch.addmm(grad_x_e, grad_up, w1[e, :, hidden:].t()))
            else:
                (grad_h,) = torch.autograd.grad(act_out, pre, u_e)
                _weight_grad(x_e, grad_h, grad_w1[e], grad_b1[e] if grad_b1 is not None else None)
                if need_x:
                    grad_x.index_add_(0, t_e, torch.mm(grad_h, w1[e].t()))
            start = stop
        grad_weights = None
        if need_weights:
            grad_weights = torch.zeros(weights.numel(), dtype=grad_weights_sorted.dtype, device=weights.device)
            grad_weights.index_copy_(0, order[:grad_weights_sorted.numel()], grad_weights_sorted)
            grad_weights = grad_weights.view_as(weights).to(ctx.weights_dtype)
        ctx.saved_hidden = None
        return grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None, None


def fused_expert_mlp(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: List[int], k: int,
                     w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                     act: nn.Module, glu: bool) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * MLP_{e(t, j)}(x[t])`` by a per-expert loop.

    Args:
        x: ``[T, D]`` tokens.
        weights: ``[T, k]`` combine weights.
        order: flat assignment ids sorted by expert (``DispatchPlan.order``); ids past ``sum(counts)``
            (dropped) are skipped.
        counts: assignments per expert (host ints).
        k: experts per token.
        w1, b1, w2, b2: stacked expert parameters ``[E, D, H']``, ``[E, H']``, ``[E, H, D']``, ``[E, D']``.
        act: activation module; glu: gated form (``h`` holds gate then up).

    Returns:
        ``[T, D']``.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _FusedExpertMLP.apply(x, weights, w1, b1, w2, b2, order, counts, k, act, glu)
