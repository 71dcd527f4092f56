"""Dropless token dispatch: the one hot path every moemix MoE layer shares.

The ``N = T * k`` (token, expert) assignments are sorted by expert id once (:func:`plan_dispatch`, one
host sync for the per-expert counts). Four strategies then run the experts:

- ``"loop"``: a fused per-expert loop (:mod:`moemix.layers.expert_loop`): gather the expert's tokens,
  GEMM, activation, GEMM, weighted ``index_add`` into the output, all in one autograd node whose
  temporaries are per expert (experts with adjacent rows share the gather, activation and scatter).
  Fastest on CPU for many rows per expert or large experts.
- ``"sorted"``: an expert buffer of ``N`` rows, expert ``e`` owning a contiguous slice of ``counts[e]``
  rows (megablocks dMoE / scattermoe style), one GEMM per slice (:func:`grouped_matmul`).
- ``"padded"``: an expert buffer of ``E * C`` rows, ``C = max(counts)``, viewed as ``[E, C, D]``; all
  experts run as one batched GEMM. Pays for padding, saves per-expert calls: fastest on CPU when experts
  get few rows each and little work per call (small batches of small experts) and routing is not too
  skewed.
- ``"grouped_mm"``: the sorted buffer, with every expert's slice in one
  :func:`torch.nn.functional.grouped_mm` call (float32, bfloat16 or float16; the slice ends go to the kernel
  as a device tensor, so the GEMMs need no host counts). ``"auto"`` picks it on CUDA in bfloat16.

``"auto"`` picks per call with :func:`choose_layout` (rules from ``benchmarks/moe_layer.py``). For the
buffer layouts the combine and the dispatch backward are ``embedding_bag`` gather-reduces, so no
serial scatter-add accumulates and the ``[T*k, D]`` per-assignment copies exist only where a GEMM
needs them.

    x [T, D] --dispatch_tokens--> rows [R, D] --experts--> out_rows [R, D'] --combine_tokens(w)--> [T, D']

Dropped assignments (capacity mode; loop and sorted only) sort to the end, where no expert reads
them; their output is zero.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers._first_order import first_order_backward
from moemix.layers._validate import check_choice
from moemix.layers.recycled_buffers import RecycledBuffer, RecycledPool, take_or_empty

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch_tokens", "combine_tokens", "grouped_matmul", "LAYOUTS"]

LAYOUTS = ("auto", "loop", "sorted", "padded", "grouped_mm")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "auto" rule, from benchmarks/moe_layer.py --layouts loop,sorted,padded and benchmarks/dispatch_rule.py
# (a sweep of expert sizes and rows per expert; table in docs/results/dispatch_rule.md) on 2 CPU cores:
# the fused per-expert loop wins when an expert has many rows or enough work for its per-call overhead
# not to matter (mean rows x first-layer multiply-adds per row: 17M was a toss-up, from 34M the loop won
# or tied); below that the padded batched GEMM wins while padding stays small, and under skew the loop
# (its chunks share the per-expert ops) beat the sorted slices in 23 of 25 cases (sorted / loop up to 1.29;
# the sorted slices were ahead by about 1% in the other two).
PADDED_MAX_MEAN_ROWS = 128
LOOP_MIN_EXPERT_MACS = 2e7
PADDED_MAX_WASTE = 1.5
# On CUDA (H200, torch 2.11, benchmarks/cuda_suite.sh: --quick runs in float32 and bfloat16, CUDA tables of
# docs/results/moe_layer.md) the batched GEMM beat the sorted slices at every configuration, skewed routing
# included (up to 4x padding), except `coarse_skewed` (1024 rows per expert) in float32, where the sorted slices
# took 6.07 ms against its 6.85 (bfloat16: 5.17 against 4.81; an earlier float32 run, `git show
# e561b56:docs/results/moe_layer.md`, had 5.33 against 6.20); beyond that padding the sorted slices bound the memory.
PADDED_MAX_WASTE_CUDA = 4.0
# On CUDA in bfloat16 (H200, torch 2.11, --quick run with --layouts loop,sorted,padded,grouped_mm, the
# "CUDA, bfloat16, run 2" table of docs/results/moe_layer.md) the grouped_mm layout beat the padded one at 7 of 8
# configurations (padded / grouped_mm 1.01-1.30, median of per-round ratios) and tied at small_coarse_skewed
# (0.99); in float32, where F.grouped_mm takes a slow path, the padded layout took 0.37-0.83 of its time except at
# coarse_skewed. float16 has not been measured, so it keeps the padded/sorted rule.
GROUPED_MM_AUTO_DTYPES = (torch.bfloat16,)


@dataclass
class DispatchPlan:
    """Where each of the ``N = T * k`` assignments lives in the expert buffer.

    Attributes:
        num_tokens: ``T``.
        k: experts per token.
        slot: ``[N]`` buffer row of each flat assignment ``t * k + j``.
        row_token: ``[R]`` source token of each buffer row; ``T`` for padding / dropped rows.
        order: ``[R]`` flat assignment held by each row (sorted layout only, else None).
        counts: per-expert assignment counts (host ints, length ``E``).
        tokens_per_expert: the same counts as an ``[E]`` int64 tensor.
        row_assignment: ``[R]`` flat assignment held by each row; ``N`` for padding / dropped rows.
        capacity: rows per expert ``C`` in the padded layout, None in the sorted layout.
        num_dropped: assignments dropped by a capacity limit (their rows trail the last expert).
        layout: the strategy the experts run (``"loop"``, ``"sorted"``, ``"padded"`` or ``"grouped_mm"``).
        offsets: ``[E]`` int32 end row of each expert's slice (``grouped_mm`` layout only, else None).
    """

    num_tokens: int
    k: int
    slot: torch.Tensor
    row_token: torch.Tensor
    order: Optional[torch.Tensor]
    counts: List[int]
    tokens_per_expert: torch.Tensor
    row_assignment: torch.Tensor
    capacity: Optional[int] = None
    num_dropped: int = 0
    layout: str = "sorted"
    offsets: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.row_token.numel()


def choose_layout(counts: List[int], num_dropped: int = 0, device_type: str = "cpu",
                  macs_per_row: Optional[int] = None, grouped_mm_ok: bool = False) -> str:
    """The strategy ``"auto"`` takes for these per-expert counts (rules measured by benchmarks/moe_layer.py
    and benchmarks/dispatch_rule.py). ``macs_per_row``: multiply-adds of one row through an expert's first
    layer (``in_features * H'``); None leaves the expert size out of the CPU rule. ``grouped_mm_ok``: the
    experts can run in ``F.grouped_mm`` and gain by it (:func:`grouped_mm_pays_off`)."""
    routed = sum(counts)
    hit = sum(1 for c in counts if c)
    padded_rows = len(counts) * max(counts, default=0)
    if device_type == "cuda":
        if grouped_mm_ok and not num_dropped:
            return "grouped_mm"
        if num_dropped or routed == 0 or padded_rows > PADDED_MAX_WASTE_CUDA * routed:
            return "sorted"
        return "padded"
    if num_dropped or routed == 0:
        return "loop"
    mean_rows = routed / hit
    small_experts = mean_rows <= PADDED_MAX_MEAN_ROWS and (
        macs_per_row is None or mean_rows * macs_per_row < LOOP_MIN_EXPERT_MACS)
    return "padded" if small_experts and padded_rows <= PADDED_MAX_WASTE * routed else "loop"


def grouped_mm_pays_off(device_type: str, dtype: torch.dtype, widths) -> bool:
    """Whether ``"auto"`` runs experts of these layer ``widths`` (inputs and outputs of both layers) in
    ``F.grouped_mm``: on CUDA, in a dtype where it was measured faster (``GROUPED_MM_AUTO_DTYPES``), with
    16-byte aligned rows, on a torch that has it."""
    if device_type != "cuda" or dtype not in GROUPED_MM_AUTO_DTYPES or not hasattr(F, "grouped_mm"):
        return False
    align = 16 // torch.empty((), dtype=dtype).element_size()
    return all(w % align == 0 for w in widths)


def _ids_out_of_range(num_experts: int, how_many) -> ValueError:
    return ValueError(f"indices must be expert ids in [0, num_experts={num_experts}), got {how_many} outside "
                      "that range")


def plan_dispatch(indices: torch.Tensor, num_experts: int, kept: Optional[torch.Tensor] = None,
                  layout: str = "auto", macs_per_row: Optional[int] = None, grouped_mm_ok: bool = False
                  ) -> DispatchPlan:
    """Plan the expert buffer for ``[T, k]`` expert ids.

    Args:
        indices: ``[T, k]`` int64 expert ids.
        num_experts: ``E``.
        kept: optional ``[T, k]`` bool; False assignments are dropped (forces the sorted layout).
        layout: ``"auto"``, ``"loop"``, ``"sorted"``, ``"padded"`` or ``"grouped_mm"``. ``"loop"`` and
            ``"grouped_mm"`` plan like ``"sorted"``; ``"loop"`` tells the experts to run the fused per-expert
            loop (:mod:`moemix.layers.expert_loop`) instead of building the buffer, ``"grouped_mm"`` adds the
            slice ends (``offsets``) for :func:`torch.nn.functional.grouped_mm`. Defaults to ``"auto"``
            (:func:`choose_layout`).
        macs_per_row: multiply-adds of one row through an expert's first layer (``in_features * H'``),
            for the ``"auto"`` rule; None: rows per expert only.
        grouped_mm_ok: for the ``"auto"`` rule, the experts can run the ``"grouped_mm"`` layout and gain by
            it (:func:`grouped_mm_pays_off`). Defaults to False.
    """
    check_choice("layout", layout, LAYOUTS)
    num_tokens, k = indices.shape
    device = indices.device
    flat = indices.reshape(-1)
    out_of_range = None
    if kept is not None:  # dropped assignments go to bin E, so out-of-range ids are counted before masking
        out_of_range = ((flat < 0) | (flat >= num_experts)).sum().view(1)
        flat = torch.where(kept.reshape(-1), flat, torch.full_like(flat, num_experts)).clamp_(0, num_experts)
    # Float keys on CPU: its integer sorts take a slow parallel path (100x slower at 2 threads); ids < 2^24 are exact.
    float_keys = device.type == "cpu" and num_experts < 2 ** 24
    order = torch.sort(flat.float() if float_keys else flat, stable=True).indices
    try:  # without a capacity, ids >= E land in bins E and beyond, and bincount refuses negative ones
        bins = torch.bincount(flat, minlength=num_experts + 1)
    except RuntimeError as exc:
        raise _ids_out_of_range(num_experts, "some") from exc
    # The one host sync: buffer sizes are needed on the host.
    all_counts = (bins if out_of_range is None else torch.cat([bins, out_of_range])).tolist()
    bad = all_counts.pop() if out_of_range is not None else sum(all_counts[num_experts:])
    if bad:
        raise _ids_out_of_range(num_experts, bad)
    counts, num_dropped = all_counts[:num_experts], all_counts[num_experts]
    tokens_per_expert = bins[:num_experts]
    n = flat.numel()
    if layout in ("padded", "grouped_mm") and num_dropped:
        raise ValueError(f"layout={layout!r} cannot hold dropped assignments; use layout='sorted' with a capacity")
    if layout == "auto":
        layout = choose_layout(counts, num_dropped, device.type, macs_per_row, grouped_mm_ok)
    arange = torch.arange(n, device=device)
    if layout != "padded":
        slot = torch.empty_like(order)
        slot[order] = arange
        row_token = torch.div(order, k, rounding_mode="floor")
        row_assignment = order
        if num_dropped:
            row_token[n - num_dropped:] = num_tokens
            row_assignment = order.clone()
            row_assignment[n - num_dropped:] = n
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32) if layout == "grouped_mm" else None
        return DispatchPlan(num_tokens, k, slot, row_token, order, counts, tokens_per_expert, row_assignment,
                            None, num_dropped, layout, offsets)
    capacity = max(counts, default=0)
    expert_sorted = flat[order]
    starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
    slot_sorted = expert_sorted * capacity + (arange - starts[expert_sorted])
    slot = torch.empty_like(order)
    slot[order] = slot_sorted
    row_token = torch.full((num_experts * capacity,), num_tokens, dtype=torch.long, device=device)
    row_token[slot_sorted] = torch.div(order, k, rounding_mode="floor")
    row_assignment = torch.full((num_experts * capacity,), n, dtype=torch.long, device=device)
    row_assignment[slot_sorted] = order
    return DispatchPlan(num_tokens, k, slot, row_token, None, counts, tokens_per_expert, row_assignment, capacity, 0,
                        "padded")


class _DispatchTokens(torch.autograd.Function):
    """``x [T, D] -> rows [R, D]`` (zero rows for padding); backward sums each token's k copies."""

    @staticmethod
    def forward(ctx, x, row_token, slot, k, has_empty_rows, pool):
        ctx.save_for_backward(slot)
        ctx.k = k
        if has_empty_rows:  # padding / dropped rows read an appended zero row
            x = torch.cat([x, x.new_zeros(1, x.shape[-1])])
        return torch.index_select(x, 0, row_token, out=take_or_empty(pool, x, (row_token.numel(), x.shape[-1])))

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        (slot,) = ctx.saved_tensors
        # grad_x[t] = sum_j grad[slot[t, j]]: a gather-reduce that never materialises [T*k, D]
        grad_x = F.embedding_bag(slot.view(-1, ctx.k), grad, mode="sum")
        return grad_x, None, None, None, None, None


def dispatch_tokens(x: torch.Tensor, plan: DispatchPlan, pool: Optional[RecycledPool] = None) -> torch.Tensor:
    """Copy tokens ``[T, D]`` into the expert buffer ``[R, D]`` described by ``plan`` (into memory recycled
    across steps from ``pool`` when given)."""
    return _DispatchTokens.apply(x, plan.row_token, plan.slot, plan.k, _has_empty_rows(plan), pool)


def _has_empty_rows(plan: DispatchPlan) -> bool:
    """Whether the buffer has rows that hold no assignment (padding, dropped assignments)."""
    return plan.num_rows > plan.slot.numel() or plan.num_dropped > 0


class _CombineTokens(torch.autograd.Function):
    """``rows [R, D], w [T, k] -> y[t] = sum_j w[t, j] * rows[slot[t, j]]``, gather-reduces only."""

    @staticmethod
    def forward(ctx, rows, weights, slot, row_token, row_weight_index, has_empty_rows, pool):
        num_tokens, k = weights.shape
        w = weights.to(rows.dtype)
        ctx.save_for_backward(rows, w, slot, row_token, row_weight_index)
        ctx.weights_dtype, ctx.pool, ctx.has_empty_rows = weights.dtype, pool, has_empty_rows
        return F.embedding_bag(slot.view(num_tokens, k), rows, mode="sum", per_sample_weights=w)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        rows, w, slot, row_token, row_weight_index = ctx.saved_tensors
        grad = grad.to(rows.dtype).contiguous()
        if grad.shape[0] == 0:
            return torch.zeros_like(rows), torch.zeros_like(w, dtype=ctx.weights_dtype), None, None, None, None, None
        # grad of row r is grad[token of r] (unweighted first, for the weight gradient)
        safe_token = row_token.clamp(max=grad.shape[0] - 1)
        grad_rows = torch.index_select(grad, 0, safe_token, out=take_or_empty(ctx.pool, rows))
        grad_w = None
        if ctx.needs_input_grad[1]:
            dots = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
            chunk = max(1, min(rows.shape[0], _CHUNK_ROWS))  # chunked: no [R, D] temporary
            products = take_or_empty(ctx.pool, rows, (chunk, rows.shape[1]))
            for start in range(0, rows.shape[0], chunk):
                stop = min(start + chunk, rows.shape[0])
                torch.mul(rows[start:stop], grad_rows[start:stop], out=products[:stop - start])
                torch.sum(products[:stop - start], dim=-1, out=dots[start:stop])
            del products
            grad_w = dots.index_select(0, slot).view_as(w).to(ctx.weights_dtype)
        # padding and dropped rows point at an appended zero weight, so their gradient is zero
        row_weights = torch.cat([w.reshape(-1), w.new_zeros(1)]) if ctx.has_empty_rows else w.reshape(-1)
        grad_rows.mul_(row_weights.index_select(0, row_weight_index).unsqueeze(-1))
        return grad_rows, grad_w, None, None, None, None, None


_CHUNK_ROWS = 4096


def combine_tokens(rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan,
                   pool: Optional[RecycledPool] = None) -> torch.Tensor:
    """Weighted sum of each token's ``k`` expert outputs: ``[R, D], [T, k] -> [T, D]``.

    ``y[t] = sum_j weights[t, j] * rows[slot[t, j]]`` as one ``embedding_bag`` gather-reduce, so the
    ``[T*k, D]`` per-assignment outputs are never materialised. The backward gathers the output
    gradient once per row and takes the weight gradients as row-wise dot products; with ``pool`` the
    gathered ``[R, D]`` gradient and the products reuse memory across steps.
    """
    return _CombineTokens.apply(rows, weights, plan.slot, plan.row_token, plan.row_assignment, _has_empty_rows(plan),
                                pool)


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
    align = 16 // x.element_size()
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
    dtype = _autocast_dtype(x.device.type)
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
