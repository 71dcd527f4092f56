"""``grouped_matmul``: each expert's rows times its own weight, in any layout of a dispatch plan: one GEMM per
slice (sorted; one ``[E, in, out]`` weight gradient instead of a full-size one per expert as stock autograd of
``weight[e]`` would make), one stock ``bmm`` (padded), one ``F.grouped_mm`` call each way (grouped_mm)."""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers.dispatch import DispatchPlan

__all__ = ["grouped_matmul", "grouped_mm_supported", "autocast_dtype", "first_order"]


def first_order(backward):
    """Decorates a custom ``backward`` that has first-order gradients only: asked for a graph of its
    gradients (``create_graph=True``) it raises instead of silently dropping the second-order terms."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{backward.__qualname__.split('.')[0].lstrip('_')} has first-order gradients only "
                               "(create_graph=True is not supported)")
        return backward(ctx, *grads)
    return checked


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type`` when autocast is on there, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def grouped_mm_supported(device_type: str, dtype: torch.dtype, widths) -> bool:
    """Whether ``"auto"`` runs experts with these layer ``widths`` in ``F.grouped_mm``: CUDA, bfloat16 or
    float16, every width a multiple of 8 (16-byte rows), a torch that has it."""
    return (device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and hasattr(F, "grouped_mm")
            and all(w % 8 == 0 for w in widths))


class _SortedMatmul(torch.autograd.Function):
    """``x[slice_e] @ w[e] + b[e]`` for contiguous row slices of ``counts[e]`` rows."""

    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        out = x.new_empty(x.shape[0], weight.shape[-1])
        for e, (start, stop) in enumerate(_slices(counts)):
            if bias is None:
                torch.mm(x[start:stop], weight[e], out=out[start:stop])
            else:
                torch.addmm(bias[e], x[start:stop], weight[e], out=out[start:stop])
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad.new_empty(weight.shape[0], weight.shape[-1]) if need_b and ctx.has_bias else None
        for e, (start, stop) in enumerate(_slices(ctx.counts)):
            g = grad[start:stop]
            if grad_x is not None:
                torch.mm(g, weight[e].t(), out=grad_x[start:stop])
            if grad_w is not None:
                torch.mm(x[start:stop].t(), g, out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


class _GroupedMM(torch.autograd.Function):
    """``F.grouped_mm`` over slices ending at ``offsets``, with a backward on every device (the weight
    gradient as its 2-D x 2-D form)."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, row_expert):
        out = F.grouped_mm(x, weight, offs=offsets)
        if bias is not None:
            out.add_(bias.index_select(0, row_expert))
        ctx.save_for_backward(x, weight, offsets, row_expert)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad):
        x, weight, offsets, row_expert = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = F.grouped_mm(grad, weight.transpose(-2, -1), offs=offsets) if need_x else None
        grad_w = None
        if need_w:  # experts without rows: the kernel leaves their slot undefined
            starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
            grad_w = F.grouped_mm(x.t(), grad, offs=offsets) * (offsets > starts).to(grad.dtype)[:, None, None]
        grad_b = None
        if need_b and row_expert is not None:
            grad_b = grad.new_zeros(weight.shape[0], weight.shape[-1]).index_add_(0, row_expert, grad)
        return grad_x, grad_w, grad_b, None, None


def _check_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> None:
    align = 16 // x.element_size()
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or weight.shape[1] % align or weight.shape[2] % align:
        raise ValueError(f"the grouped_mm layout needs torch.nn.functional.grouped_mm, float32/bfloat16/float16 and "
                         f"widths that are multiples of {align} (16-byte rows); got {x.dtype} and weight "
                         f"{tuple(weight.shape)}: use dispatch_layout='sorted' or 'padded'")


def _slices(counts: List[int]):
    start = 0
    for n in counts:
        yield start, start + n
        start += n


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, plan: Optional[DispatchPlan],
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each expert's rows times its weight: ``x [R, in]``, ``weight [E, in, out]``, ``bias [E, out]`` ->
    ``[R, out]``, the rows in ``plan``'s layout (see :mod:`moemix.layers.dispatch`). ``plan=None`` with one
    expert runs every row through it (a dense layer). Runs in the autocast dtype when autocast is on."""
    dtype = autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        if plan is None:
            if weight.shape[0] != 1:
                raise ValueError(f"plan may be None only with a single expert, weight has {weight.shape[0]}")
            return x @ weight[0] if bias is None else torch.addmm(bias[0], x, weight[0])
        if x.shape[0] != plan.num_rows:
            raise ValueError(f"x must have the plan's {plan.num_rows} rows, got {x.shape[0]}")
        if plan.layout == "padded":
            xb = x.reshape(weight.shape[0], plan.capacity, x.shape[-1])
            out = torch.bmm(xb, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), xb, weight)
            return out.reshape(x.shape[0], weight.shape[-1])
        if plan.layout == "grouped_mm":
            _check_grouped_mm(x, weight)
            return _GroupedMM.apply(x.contiguous(), weight, bias, plan.offsets,
                                    None if bias is None else plan.row_expert())
        return _SortedMatmul.apply(x.contiguous(), weight, bias, plan.counts)
