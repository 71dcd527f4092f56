"""Fused per-expert MLP loop: gather, GEMM, activation, GEMM, weighted scatter in one autograd node.

For each expert ``e`` with assignments ``r_e`` (tokens ``t_e = r_e // k``, router weights ``w_e``):

    x_e = x[t_e]      h_e = x_e @ W1_e + b1_e      a_e = act(h_e)  (GLU: act(gate) * up)
    y[t_e] += w_e * (a_e @ W2_e + b2_e)

The GEMMs run per expert; everything else runs per chunk: experts whose rows are adjacent in sorted
order, together up to a size budget (:func:`expert_chunks`), share one gather, one activation, one
router-weight multiply and one scatter. With few rows per expert that removes most of the per-expert op
calls; an expert with many rows is a chunk of its own.

Saved per chunk: ``x_c``, ``h_c`` (one GEMM per expert against the whole ``W1_e``; for GLU gate and up
are its column halves) and ``act(h_c)`` (``act(gate)`` for GLU), the tensors autograd would keep, but
neither the weighted ``a_c`` nor the ``[T*k, D]`` expert outputs. In the backward, with
``g_e = grad_y[t_e]`` and ``u_e = g_e @ W2_e^T``, the router-weight gradient is ``a_e . u_e + g_e . b2_e``
and the activation gradient ``w_e * u_e``; the gate and up gradients are written side by side into one
``[n, 2H]`` tensor (:func:`moemix.layers.activations.gated_activation_grad`), so ``W1_e``'s weight
gradient and the input gradient are one GEMM each. Every temporary is per chunk (on CPU it comes from
the allocator's recycled heap instead of freshly faulted pages), a chunk's saved tensors are let go once
its gradient is done, and the stacked weight gradients go into recycled buffers
(:mod:`moemix.layers.recycled_buffers`). On CPU, groups of experts run side by side on worker threads
(:mod:`moemix.layers.expert_workers`).
"""
from __future__ import annotations

import itertools
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from moemix.layers._first_order import first_order_backward
from moemix.layers.activations import activation_backward, activation_forward, apply_activation, gated_activation_grad
from moemix.layers.cpu_gemm import cpu_gemm, matmul
from moemix.layers.expert_workers import plan_expert_groups, run_expert_groups
from moemix.layers.grouped_gemm import autocast_dtype
from moemix.layers.recycled_buffers import RecycledBuffer, take_or_empty

__all__ = ["fused_expert_mlp", "fused_loop_supports", "saved_tensor_hooks_active", "expert_chunks",
           "CHUNK_MAX_ELEMENTS"]


def _weight_grad(x: torch.Tensor, grad: torch.Tensor, grad_w: Optional[torch.Tensor],
                 grad_b: Optional[torch.Tensor], library: str) -> None:
    """``grad_w = x^T grad`` (in ``library``) and ``grad_b = sum(grad)`` into the given tensors (None: not
    needed)."""
    if grad_w is not None:
        matmul(x.t(), grad, out=grad_w, library=library)
    if grad_b is not None:
        torch.sum(grad, dim=0, out=grad_b)


def _rows(tensor: Optional[torch.Tensor]) -> list:
    """Per-expert views ``tensor[e]`` (one call instead of ``E`` indexing ops); empty for None."""
    return tensor.unbind(0) if tensor is not None else []


def _at(rows: list, e: int) -> Optional[torch.Tensor]:
    """``rows[e]``, or None for an absent (bias) tensor."""
    return rows[e] if rows else None


def _sum_into_first(parts: List[Optional[torch.Tensor]], empty: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of the worker groups' partial results (the first one accumulates); ``empty()`` when none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return empty()
    for part in parts[1:]:
        parts[0].add_(part)
    return parts[0]


# Experts whose rows are adjacent in sorted order share one gather, one activation, one router-weight
# multiply and one scatter while their rows times first-layer width stay within this many elements
# (4 MiB of fp32 ``h``); their GEMMs stay per expert, and an expert with more rows runs alone. Every
# expert alone took 1.14x the chunked time with 64 experts of 16 rows (`small_fine`), 1.08x with 32 rows,
# 1.04x at `small_coarse` and 0.95-1.00x with 512 or more rows per expert (2 CPU cores, forward +
# backward; benchmarks/dispatch_rule.py --extra loop_unchunked, docs/results/loop_chunks.md).
CHUNK_MAX_ELEMENTS = 1 << 20


def expert_chunks(group: List[int], starts: List[int], width: int) -> List[List[int]]:
    """Split ``group`` (expert ids, ascending) into runs of experts whose rows are adjacent in sorted order
    (``starts[e]``: first row of expert ``e``; ``starts[E]``: total) with at most ``CHUNK_MAX_ELEMENTS``
    rows x ``width`` each; an expert larger than that runs alone."""
    chunks: List[List[int]] = []
    for e in group:
        if chunks:
            last = chunks[-1]
            adjacent = starts[last[-1] + 1] == starts[e]
            if adjacent and (starts[e + 1] - starts[last[0]]) * width <= CHUNK_MAX_ELEMENTS:
                last.append(e)
                continue
        chunks.append([e])
    return chunks


class _Chunk:
    """Chunk ``index`` of a call: a run of experts with adjacent rows, sorted rows ``[begin, end)``, each
    expert's ``(e, first, end)`` rows relative to ``begin``."""

    __slots__ = ("index", "begin", "end", "experts")

    def __init__(self, index: int, experts: List[int], starts: List[int]):
        self.index = index
        self.begin, self.end = starts[experts[0]], starts[experts[-1] + 1]
        self.experts = [(e, starts[e] - self.begin, starts[e + 1] - self.begin) for e in experts]

    @property
    def rows(self) -> int:
        return self.end - self.begin


def _stacked(parts: List[torch.Tensor]) -> torch.Tensor:
    """The experts' row blocks of a chunk as one tensor (no copy for a single expert)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _SavedSlots:
    """Per-chunk ``x_c [n, D]``, ``h_c [n, H']``, ``act(h_c) [n, H]`` as views of one flat buffer, taken
    from a :class:`RecycledBuffer` so the saved activations reuse last step's memory."""

    def __init__(self, workspace: Optional[RecycledBuffer], rows: List[int], widths: Tuple[int, int, int],
                 like: torch.Tensor):
        self.widths, self.row_width = widths, sum(widths)
        self.starts = [0, *itertools.accumulate(rows)]  # first row of each chunk
        self.rows = rows
        shape = (sum(rows) * self.row_width,)
        if workspace is None:
            self.flat = torch.empty(shape, dtype=like.dtype, device=like.device)
        else:  # sizes change with the routing: leave room so the buffer is rarely replaced
            self.flat = workspace.take_shape(shape, like.dtype, like.device, headroom=1.125)

    def views(self, c: int) -> Tuple[torch.Tensor, ...]:
        n, offset, out = self.rows[c], self.starts[c] * self.row_width, []
        for width in self.widths:
            out.append(self.flat[offset:offset + n * width].view(n, width))
            offset += n * width
        return tuple(out)


def _chunk_activations(x: torch.Tensor, t_c: torch.Tensor, chunk: _Chunk, w1s: list, b1s: list, act: nn.Module,
                       hidden: int, glu: bool, library: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A chunk's ``x_c = x[t_c]``, ``h_c = x_c @ W1_e + b1_e`` (per expert) and ``act(h_c)`` (``act(gate)`` for
    GLU), freshly allocated."""
    x_c = x.index_select(0, t_c)
    h_c = _stacked([matmul(x_c[i:j], w1s[e], _at(b1s, e), library=library) for e, i, j in chunk.experts])
    return x_c, h_c, apply_activation(act, h_c[:, :hidden] if glu else h_c)


class _FusedExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, w1, b1, w2, b2, order, counts, k, act, glu, grad_buffers, workspace, keep):
        hidden = w2.shape[1]
        tokens_sorted = torch.div(order, k, rounding_mode="floor")
        weights_sorted = weights.reshape(-1).index_select(0, order).to(x.dtype).unsqueeze(-1)
        starts = [0, *itertools.accumulate(counts)]
        w1s, w2s, b1s, b2s = _rows(w1), _rows(w2), _rows(b1), _rows(b2)
        groups = plan_expert_groups(x.device, counts, x.shape[1] * w1.shape[-1])
        runs = [expert_chunks(g, starts, w1.shape[-1]) for g in groups]
        index = itertools.count()
        chunks = [[_Chunk(next(index), experts, starts) for experts in group] for group in runs]
        chunk_list = [c for group in chunks for c in group]
        saved: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * len(chunk_list)
        slots = _SavedSlots(workspace, [c.rows for c in chunk_list], (x.shape[1], w1.shape[-1], hidden), x) \
            if keep else None
        act_forward = activation_forward(act)
        library = cpu_gemm(x)

        def run(group: List[_Chunk]) -> torch.Tensor:
            out = x.new_zeros(x.shape[0], w2.shape[-1])
            for chunk in group:
                t_c, w_c = tokens_sorted[chunk.begin:chunk.end], weights_sorted[chunk.begin:chunk.end]
                if slots is not None:  # kept in the recycled buffer (oneDNN's product is copied in: it has no out=)
                    x_c, h_c, act_out = slots.views(chunk.index)
                    torch.index_select(x, 0, t_c, out=x_c)
                    for e, i, j in chunk.experts:
                        matmul(x_c[i:j], w1s[e], _at(b1s, e), out=h_c[i:j], library=library)
                    act_forward(h_c[:, :hidden] if glu else h_c, act_out)
                else:
                    x_c, h_c, act_out = _chunk_activations(x, t_c, chunk, w1s, b1s, act, hidden, glu, library)
                a_c = act_out * h_c[:, hidden:] if glu else act_out
                if b2 is None:  # fold the router weight into a_c (a copy when it is the saved act_out)
                    a_c = a_c.mul_(w_c) if glu else a_c * w_c
                    y_c = _stacked([matmul(a_c[i:j], w2s[e], library=library) for e, i, j in chunk.experts])
                else:
                    y_c = _stacked([matmul(a_c[i:j], w2s[e], b2s[e], library=library)
                                    for e, i, j in chunk.experts]).mul_(w_c)
                out.index_add_(0, t_c, y_c)
                if keep:
                    saved[chunk.index] = (x_c, h_c, act_out)
            return out

        out = _sum_into_first(run_expert_groups(run, chunks), lambda: x.new_zeros(x.shape[0], w2.shape[-1]))
        ctx.save_for_backward(x, weights, w1, b1, w2, b2, order, tokens_sorted, weights_sorted)
        ctx.saved_experts = saved if keep else None  # views of one recycled buffer, let go in the backward
        ctx.chunks, ctx.counts, ctx.glu, ctx.act = chunks, counts, glu, act
        ctx.act_backward, ctx.grad_buffers, ctx.weights_dtype = activation_backward(act), grad_buffers, weights.dtype
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_out):
        x, weights, w1, b1, w2, b2, order, tokens_sorted, weights_sorted = ctx.saved_tensors
        # The first backward takes the activations the forward kept and lets them go chunk by chunk; a further
        # backward through the same graph (retain_graph) recomputes each chunk's from the saved inputs.
        saved = ctx.saved_experts or [None] * sum(len(group) for group in ctx.chunks)
        ctx.saved_experts = None
        return _FusedExpertMLP._backward(ctx, grad_out.contiguous(), saved, x, weights, w1, b1, w2, b2, order,
                                         tokens_sorted, weights_sorted)

    @staticmethod
    def _backward(ctx, grad_out, saved, x, weights, w1, b1, w2, b2, order, tokens_sorted, weights_sorted):
        need_x, need_weights, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        act_backward, glu, hidden, counts = ctx.act_backward, ctx.glu, w2.shape[1], ctx.counts
        library, weight_library = cpu_gemm(grad_out), cpu_gemm(grad_out, product="weight_grad")
        grad_weights_sorted = weights_sorted.new_zeros(weights_sorted.shape[0])
        buffers = ctx.grad_buffers or (None, None)
        grad_w1 = take_or_empty(buffers[0], w1) if need_w1 else None
        grad_w2 = take_or_empty(buffers[1], w2) if need_w2 else None
        grad_b1 = torch.empty_like(b1) if need_b1 else None
        grad_b2 = torch.empty_like(b2) if need_b2 else None
        w1s, w2s, b1s, b2s = _rows(w1), _rows(w2), _rows(b1), _rows(b2)
        forward_library = cpu_gemm(x) if None in saved else None  # for recomputed chunks only
        gw1s, gw2s, gb1s, gb2s = _rows(grad_w1), _rows(grad_w2), _rows(grad_b1), _rows(grad_b2)
        for e, n in enumerate(counts):
            if n == 0:  # experts without tokens get zero gradients
                for grad in (gw1s, gw2s, gb1s, gb2s):
                    if grad:
                        grad[e].zero_()

        def run(group: List[_Chunk]) -> Optional[torch.Tensor]:
            grad_x = torch.zeros_like(x) if need_x else None
            for chunk in group:
                t_c, w_c = tokens_sorted[chunk.begin:chunk.end], weights_sorted[chunk.begin:chunk.end]
                x_c, h_c, act_out = saved[chunk.index] or _chunk_activations(x, t_c, chunk, w1s, b1s, ctx.act,
                                                                             hidden, glu, forward_library)
                saved[chunk.index] = None  # this chunk's activations are no longer needed
                g_c = grad_out.index_select(0, t_c)
                # gradient of (expert output . g) w.r.t. the activation
                u_c = _stacked([matmul(g_c[i:j], w2s[e].t(), library=library) for e, i, j in chunk.experts])
                a_c = act_out * h_c[:, hidden:] if glu else act_out
                if need_weights:
                    dots = torch.sum(a_c * u_c, dim=-1, out=grad_weights_sorted[chunk.begin:chunk.end])
                    if b2 is not None:
                        for e, i, j in chunk.experts:
                            dots[i:j].add_(g_c[i:j] @ b2s[e])
                if need_w2 or need_b2:
                    if glu and b2 is None and hidden <= g_c.shape[1]:  # scale the narrower (a_c is fresh)
                        a_c.mul_(w_c)
                    else:
                        g_c.mul_(w_c)
                    for e, i, j in chunk.experts:
                        _weight_grad(a_c[i:j], g_c[i:j], _at(gw2s, e), _at(gb2s, e), weight_library)
                u_c.mul_(w_c)
                if glu:
                    grad_h = gated_activation_grad(u_c, h_c, act_out, act_backward)
                else:
                    grad_h = act_backward(u_c, h_c, act_out)
                for e, i, j in chunk.experts:
                    _weight_grad(x_c[i:j], grad_h[i:j], _at(gw1s, e), _at(gb1s, e), weight_library)
                if need_x:
                    grad_x.index_add_(0, t_c, _stacked([matmul(grad_h[i:j], w1s[e].t(), library=library)
                                                        for e, i, j in chunk.experts]))
            return grad_x

        parts = run_expert_groups(run, ctx.chunks)
        grad_x = _sum_into_first(parts, lambda: torch.zeros_like(x)) if need_x else None
        grad_weights = None
        if need_weights:
            grad_weights = torch.zeros(weights.numel(), dtype=grad_weights_sorted.dtype, device=weights.device)
            grad_weights.index_copy_(0, order, grad_weights_sorted)
            grad_weights = grad_weights.view_as(weights).to(ctx.weights_dtype)
        return grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None, None, None, None, None


def fused_loop_supports(act: nn.Module) -> bool:
    """Whether the fused loop can run ``act``: it needs a closed-form derivative (built-in, parameter-free,
    deterministic activations); any other module runs through a buffer layout and plain autograd."""
    return activation_backward(act) is not None


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are set (``torch.autograd.graph.saved_tensors_hooks``: ``save_on_cpu``,
    non-reentrant activation checkpointing). The fused loop keeps its activations on its autograd node, out
    of their reach, so the experts run a buffer layout with plain autograd while they are."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def fused_expert_mlp(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, counts: List[int], k: int,
                     w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                     act: nn.Module, glu: bool,
                     grad_buffers: Optional[Tuple[RecycledBuffer, RecycledBuffer]] = None,
                     workspace: Optional[RecycledBuffer] = None) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * MLP_{e(t, j)}(x[t])`` by a per-expert loop.

    Args:
        x: ``[T, D]`` tokens.
        weights: ``[T, k]`` combine weights.
        order: flat assignment ids sorted by expert (``DispatchPlan.order``); ids past ``sum(counts)``
            (dropped) are skipped.
        counts: assignments per expert (host ints).
        k: experts per token.
        w1, b1, w2, b2: stacked expert parameters ``[E, D, H']``, ``[E, H']``, ``[E, H, D']``, ``[E, D']``.
        act: activation module with a closed-form derivative (:func:`fused_loop_supports`); glu: gated
            form (``h`` holds gate then up).
        grad_buffers: recycled buffers for the ``w1`` and ``w2`` gradients (CPU); None allocates.
        workspace: recycled buffer for the activations kept for the backward (CPU); None allocates.

    Returns:
        ``[T, D']``. Its first backward frees the kept per-expert activations as it goes; a further backward
        through the same graph (``retain_graph=True``) recomputes them. Nothing is kept for the backward when
        no gradient is recorded (``no_grad``, inference).
    """
    if not fused_loop_supports(act):
        raise ValueError(f"act must be a built-in activation with a closed-form derivative "
                         f"(SiLU, GELU, ReLU, Tanh, Sigmoid, Identity), got {type(act).__name__}")
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)
        b1 = b1.to(dtype) if b1 is not None else None
        b2 = b2.to(dtype) if b2 is not None else None
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weights, w1, b1, w2, b2))
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _FusedExpertMLP.apply(x, weights, w1, b1, w2, b2, order, counts, k, act, glu, grad_buffers,
                                     workspace, keep)
