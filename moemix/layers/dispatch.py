"""Dropless token dispatch: the one hot path every moemix MoE layer shares.

The ``N = T * k`` (token, expert) assignments are sorted by expert id once (:func:`plan_dispatch`, one
host sync for the per-expert counts). Four strategies then run the experts:

- ``"loop"``: a fused per-expert loop (:mod:`moemix.layers.expert_loop`): gather the expert's tokens,
  GEMM, activation, GEMM, weighted ``index_add`` into the output, all in one autograd node whose
  temporaries are per expert (experts with adjacent rows share the gather, activation and scatter).
  Fastest on CPU for many rows per expert or large experts.
- ``"sorted"``: an expert buffer of ``N`` rows, expert ``e`` owning a contiguous slice of ``counts[e]``
  rows (megablocks dMoE / scattermoe style), one GEMM per slice
  (:func:`~moemix.layers.grouped_gemm.grouped_matmul`, like the two below).
- ``"padded"``: an expert buffer of ``E * C`` rows, ``C = max(counts)``, viewed as ``[E, C, D]``; all
  experts run as one batched GEMM. Pays for padding, saves per-expert calls: fastest on CPU when experts
  get few rows each and little work per call (small batches of small experts) and routing is not too
  skewed.
- ``"grouped_mm"``: the sorted buffer, with every expert's slice in one
  :func:`torch.nn.functional.grouped_mm` call (float32, bfloat16 or float16; the slice ends go to the kernel
  as a device tensor, so the GEMMs need no host counts). ``"auto"`` picks it on CUDA in bfloat16.

``"auto"`` picks per call with :func:`~moemix.layers.layout_rule.choose_layout` (rules measured by
``benchmarks/moe_layer.py`` and ``benchmarks/dispatch_rule.py``). For the
buffer layouts the combine and the dispatch backward are ``embedding_bag`` gather-reduces, so no
serial scatter-add accumulates and the ``[T*k, D]`` per-assignment copies exist only where a GEMM
needs them.

    x [T, D] --dispatch_tokens--> rows [R, D] --experts--> out_rows [R, D'] --combine_tokens(w)--> [T, D']

Dropped assignments (capacity mode; loop and sorted only) sort to the end, where no expert reads
them; their output is zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers._first_order import first_order_backward
from moemix.layers._validate import check_choice
from moemix.layers.layout_rule import choose_layout
from moemix.layers.recycled_buffers import RecycledPool, take_or_empty

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch_tokens", "combine_tokens", "LAYOUTS"]

LAYOUTS = ("auto", "loop", "sorted", "padded", "grouped_mm")


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


def _ids_out_of_range(num_experts: int, how_many) -> ValueError:
    return ValueError(f"indices must be expert ids in [0, num_experts={num_experts}), got {how_many} outside "
                      "that range")


def plan_dispatch(indices: torch.Tensor, num_experts: int, kept: Optional[torch.Tensor] = None,
                  layout: str = "auto", macs_per_row: Optional[int] = None, grouped_mm_ok: bool = False,
                  loop_gemm: str = "onednn"
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
            (:func:`~moemix.layers.layout_rule.choose_layout`).
        macs_per_row: multiply-adds of one row through an expert's first layer (``in_features * H'``),
            for the ``"auto"`` rule; None: rows per expert only.
        grouped_mm_ok: for the ``"auto"`` rule, the experts can run the ``"grouped_mm"`` layout and gain by
            it (:func:`~moemix.layers.layout_rule.grouped_mm_pays_off`). Defaults to False.
        loop_gemm: for the ``"auto"`` rule on CPU, the library the fused loop's products would run in
            (``"onednn_all"``, ``"onednn"`` or ``"blas"``, :func:`~moemix.layers.layout_rule.choose_layout`).
            Defaults to ``"onednn"``.
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
        layout = choose_layout(counts, num_dropped, device.type, macs_per_row, grouped_mm_ok, loop_gemm)
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
