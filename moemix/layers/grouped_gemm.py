"""Grouped GEMMs over an expert buffer: one GEMM per expert slice (sorted layout), one batched GEMM over
``[E, C, in]`` (padded layout), or one ``F.grouped_mm`` call (grouped_mm layout); see
:mod:`moemix.layers.dispatch` for the layouts.

Each is an autograd function that writes every expert's weight gradient into one ``[E, in, out]`` buffer, so
stacked parameters are never indexed per expert inside autograd.
"""
from __future__ import annotations

import itertools
from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers._first_order import first_order_backward
from moemix.layers.recycled_buffers import RecycledBuffer, RecycledPool, take_or_empty

__all__ = ["grouped_matmul", "grouped_mm_alignment", "autocast_dtype", "GROUPED_MM_DTYPES"]

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: ``F.grouped_mm`` wants every matrix row 16-byte aligned."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type`` when autocast is on there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _GroupedMatmul(torch.autograd.Function):
    """Per-expert ``x_e @ w[e] + b[e]`` over contiguous row slices, one output buffer.

    Gradients for the stacked ``w [E, in, out]`` are written slice by slice into one buffer, so no
    per-expert full-size gradient is ever materialised.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts, grad_buffer, pool):
        rows = sum(counts)
        out = take_or_empty(pool, x, (x.shape[0], weight.shape[-1]))
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
        ctx.counts, ctx.grad_buffer, ctx.pool = counts, grad_buffer, pool
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = None
        if need_x:
            grad_x = take_or_empty(ctx.pool, x, x.shape)
            grad_x[sum(counts):].zero_()  # rows past sum(counts) (dropped) get zero gradient
        grad_w = take_or_empty(ctx.grad_buffer, weight) if need_w else None
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
        return grad_x, grad_w, grad_b, None, None, None


class _PaddedMatmul(torch.autograd.Function):
    """``x[e] @ w[e] + b[e]`` as one batched GEMM over ``[E, C, in]``; the weight gradient goes into a
    recycled buffer when one is given, the output and the input gradient come from ``pool`` when given."""

    @staticmethod
    def forward(ctx, x, weight, bias, grad_buffer, pool):
        ctx.save_for_backward(x, weight)
        ctx.grad_buffer, ctx.pool, ctx.has_bias = grad_buffer, pool, bias is not None
        out = take_or_empty(pool, x, (*x.shape[:2], weight.shape[-1]))
        return torch.bmm(x, weight, out=out) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight, out=out)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.bmm(grad, weight.transpose(1, 2), out=take_or_empty(ctx.pool, x, x.shape)) \
            if need_x else None
        grad_w = torch.bmm(x.transpose(1, 2), grad, out=take_or_empty(ctx.grad_buffer, weight)) if need_w else None
        grad_b = grad.sum(1) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


class _GroupedMM(torch.autograd.Function):
    """``x_e @ w[e] + b[e]`` over contiguous row slices ending at ``offsets``, each direction one
    :func:`torch.nn.functional.grouped_mm` call (the weight gradient as its 2-D x 2-D form)."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, counts):
        out = F.grouped_mm(x, weight, offs=offsets)
        row_expert = None
        if bias is not None:
            row_expert = _row_experts(offsets, x.shape[0])
            out.add_(bias.index_select(0, row_expert))
        ctx.save_for_backward(x, weight, offsets, row_expert)
        ctx.empty_experts = [e for e, n in enumerate(counts) if n == 0]
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        x, weight, offsets, row_expert = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = F.grouped_mm(grad, weight.transpose(-2, -1), offs=offsets) if need_x else None
        grad_w = None
        if need_w:
            grad_w = F.grouped_mm(x.t(), grad, offs=offsets)
            for e in ctx.empty_experts:  # zeros whatever the kernel leaves in their slot
                grad_w[e].zero_()
        grad_b = None
        if need_b and row_expert is not None:
            grad_b = grad.new_zeros(weight.shape[0], weight.shape[-1]).index_add_(0, row_expert, grad)
        return grad_x, grad_w, grad_b, None, None


def _row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows]`` expert of each row of a sorted buffer whose slices end at ``offsets`` (on the device)."""
    return torch.searchsorted(offsets, torch.arange(rows, device=offsets.device, dtype=offsets.dtype), right=True)


def _check_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: List[int]) -> None:
    """What ``F.grouped_mm`` needs, with moemix's names: dtype, 16-byte aligned widths, offsets = cumsum(counts)."""
    if not hasattr(F, "grouped_mm"):
        raise RuntimeError(f"the grouped_mm layout needs torch.nn.functional.grouped_mm (torch {torch.__version__} "
                           "lacks it); use dispatch_layout='sorted' or 'padded'")
    if x.dtype not in GROUPED_MM_DTYPES:
        raise ValueError(f"the grouped_mm layout computes in {', '.join(map(str, GROUPED_MM_DTYPES))}, but the "
                         f"expert layer's input is {x.dtype}; use dispatch_layout='sorted' or 'padded' for it")
    align = grouped_mm_alignment(x.dtype)
    for name, width in (("input width", weight.shape[1]), ("output width", weight.shape[2])):
        if width % align:
            raise ValueError(f"the grouped_mm layout needs every expert layer's widths to be multiples of {align} "
                             f"in {x.dtype} (16-byte rows for F.grouped_mm), got {name} {width} (weight "
                             f"{tuple(weight.shape)}); use dispatch_layout='sorted' or 'padded'")
    if offsets.dtype != torch.int32 or offsets.shape != (weight.shape[0],):
        raise ValueError(f"offsets must be an int32 tensor of shape ({weight.shape[0]},), got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"the grouped_mm layout needs every row routed: counts sum to {sum(counts)}, x has "
                         f"{x.shape[0]} rows")
    # Checked where it costs no device sync; on an accelerator offsets are trusted (plan_dispatch makes them).
    if offsets.device.type == "cpu" and offsets.tolist() != list(itertools.accumulate(counts)):
        raise ValueError(f"offsets must be the running sum of counts {list(counts)}, got {offsets.tolist()}")


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: List[int],
                   bias: Optional[torch.Tensor] = None, capacity: Optional[int] = None,
                   grad_buffer: Optional[RecycledBuffer] = None, pool: Optional[RecycledPool] = None,
                   offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM over an expert buffer.

    Args:
        x: ``[R, in]`` expert buffer: sorted layout (``counts[e]`` contiguous rows per expert, rows past
            ``sum(counts)`` give zero output) or padded layout (``capacity`` rows per expert).
        weight: ``[E, in, out]`` stacked expert weights.
        counts: rows of each expert (host ints, length ``E``).
        bias: optional ``[E, out]``.
        capacity: rows per expert of the padded layout; None for the sorted layout.
        grad_buffer: recycles the weight gradient's memory across steps (CPU); see
            :mod:`moemix.layers.recycled_buffers`.
        pool: recycles the output's and the input gradient's memory across steps (CPU): fresh
            ``[R, out]`` rows each step would fault their pages in anew.
        offsets: ``[E]`` int32 end row of each expert's slice on ``x``'s device (``plan.offsets``, the running
            sum of ``counts``; checked on CPU only, where that needs no device sync): the sorted layout, every
            row routed, in :func:`torch.nn.functional.grouped_mm` (``grad_buffer`` and ``pool`` unused). Its
            kernels want 16-byte rows: ``in`` and ``out`` multiples of 4 in float32, of 8 in bfloat16/float16.

    Returns:
        ``[R, out]``. Runs in the autocast dtype when autocast is on.
    """
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        if offsets is not None:
            _check_grouped_mm(x, weight, offsets, counts)
            return _GroupedMM.apply(x.contiguous(), weight, bias, offsets, counts)
        if capacity is not None:
            xb = x.reshape(weight.shape[0], capacity, x.shape[-1])
            return _PaddedMatmul.apply(xb, weight, bias, grad_buffer, pool).view(x.shape[0], weight.shape[-1])
        return _GroupedMatmul.apply(x.contiguous(), weight, bias, counts, grad_buffer, pool)
