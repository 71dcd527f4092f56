"""Dropless token dispatch, the one path every moemix MoE layer shares.

:func:`plan_dispatch` sorts the ``N = T * k`` assignments by expert (one host sync for the counts),
:func:`dispatch_tokens` gathers the tokens into an expert buffer, the experts run on it, and
:func:`combine_tokens` sums each token's ``k`` outputs with its router weights (one ``embedding_bag``)::

    x [T, D] --dispatch_tokens--> rows [R, D] --experts--> out_rows [R, D'] --combine_tokens(w)--> [T, D']

Layouts: ``"sorted"`` (``R = N``, expert ``e`` owns a contiguous slice of ``counts[e]`` rows; one GEMM per
slice), ``"padded"`` (``R = E * C`` with ``C = max(counts)``, viewed as ``[E, C, D]`` for one batched GEMM;
padding rows are zero and never read back), ``"grouped_mm"`` (the sorted rows in one
:func:`torch.nn.functional.grouped_mm` call). ``"auto"`` asks :func:`choose_layout`. Assignments dropped by a
capacity limit get no row and add zero to their token's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers._validate import check_choice

__all__ = ["DispatchPlan", "plan_dispatch", "dispatch_tokens", "combine_tokens", "choose_layout", "LAYOUTS"]

LAYOUTS = ("auto", "sorted", "padded", "grouped_mm")
# Padded rows per routed row up to which "auto" pads: on CPU only balanced routing pays, on CUDA one launch pays more.
PADDED_MAX_WASTE = {"cpu": 1.5, "cuda": 4.0}
PADDED_MAX_MEAN_ROWS_CPU = 128


@dataclass
class DispatchPlan:
    """Where each of the ``N = T * k`` assignments lives in the expert buffer.

    ``counts`` (host ints) and ``tokens_per_expert`` (``[E]`` int64) count the kept assignments per expert;
    ``slot [T, k]`` is the buffer row of each assignment (``R``, one past the buffer, where dropped);
    ``row_token [R]`` the source token of each row (``T`` for padding); ``capacity`` the rows per expert of
    the padded layout and ``offsets`` (``[E]`` int32) the slice ends of the grouped_mm layout, else None.
    """

    num_tokens: int
    k: int
    layout: str
    counts: List[int]
    tokens_per_expert: torch.Tensor
    slot: torch.Tensor
    row_token: torch.Tensor
    num_dropped: int = 0
    capacity: Optional[int] = None
    offsets: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        """``R``, the rows of the expert buffer."""
        return self.row_token.numel()

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    def row_expert(self) -> torch.Tensor:
        """``[R]`` expert of each buffer row (for per-expert values an expert applies row by row)."""
        experts = torch.arange(self.num_experts, device=self.row_token.device)
        if self.layout == "padded":
            return experts.repeat_interleave(self.capacity)
        return experts.repeat_interleave(self.tokens_per_expert, output_size=self.num_rows)


def choose_layout(counts: List[int], device_type: str = "cpu", num_dropped: int = 0,
                  grouped_mm_ok: bool = False) -> str:
    """The layout ``"auto"`` takes for these per-expert ``counts`` on ``device_type``; ``grouped_mm_ok``: the
    experts can run ``F.grouped_mm`` in the compute dtype (CUDA, bfloat16/float16, aligned widths).

    One batched GEMM beats per-expert GEMMs while padding costs little and, on CPU, while experts get few
    rows (with many rows each the per-expert GEMMs are as fast and their temporaries smaller)."""
    if num_dropped:
        return "sorted"
    if grouped_mm_ok:
        return "grouped_mm"
    routed, hit = sum(counts), sum(1 for c in counts if c)
    if routed == 0:
        return "sorted"
    balanced = len(counts) * max(counts) <= PADDED_MAX_WASTE.get(device_type, PADDED_MAX_WASTE["cpu"]) * routed
    return "padded" if balanced and (device_type != "cpu" or routed / hit <= PADDED_MAX_MEAN_ROWS_CPU) else "sorted"


def plan_dispatch(indices: torch.Tensor, num_experts: int, kept: Optional[torch.Tensor] = None,
                  layout: str = "auto", grouped_mm_ok: bool = False) -> DispatchPlan:
    """Plan the expert buffer for expert ids ``indices [T, k]``.

    Args:
        indices: ``[T, k]`` int64 expert ids in ``[0, num_experts)``.
        num_experts: ``E``.
        kept: optional ``[T, k]`` bool; False assignments are dropped (capacity mode, not in the padded or
            grouped_mm layouts).
        layout: one of ``LAYOUTS``; ``"auto"`` asks :func:`choose_layout`.
        grouped_mm_ok: for ``"auto"``, the experts can run the grouped_mm layout in the compute dtype.
    """
    check_choice("layout", layout, LAYOUTS)
    num_tokens, k = indices.shape
    flat = indices.reshape(-1)
    bad = ((flat < 0) | (flat >= num_experts)).sum().view(1)
    if kept is not None:  # dropped assignments go to bin E, after every expert
        flat = torch.where(kept.reshape(-1), flat, num_experts).clamp_(0, num_experts)
    bins = torch.bincount(flat.clamp(0, num_experts), minlength=num_experts + 1)
    *counts, num_dropped, num_bad = torch.cat([bins, bad]).tolist()  # the one host sync
    if num_bad:
        raise ValueError(f"indices must be expert ids in [0, num_experts={num_experts}), got {num_bad} outside it")
    if num_dropped and layout in ("padded", "grouped_mm"):
        raise ValueError(f"layout={layout!r} cannot hold dropped assignments; use 'sorted' or 'auto'")
    if layout == "auto":
        layout = choose_layout(counts, indices.device.type, num_dropped, grouped_mm_ok)
    # CPU sorts of integer keys take a slow parallel path; float keys sort exactly below 2**24 experts.
    keys = flat.float() if flat.device.type == "cpu" and num_experts < 2 ** 24 else flat
    order = torch.sort(keys, stable=True).indices
    routed = flat.numel() - num_dropped
    tokens_per_expert = bins[:num_experts]
    row_token = torch.div(order[:routed], k, rounding_mode="floor")
    rank = torch.arange(flat.numel(), device=flat.device)
    capacity = offsets = None
    if layout == "padded":
        capacity = max(counts, default=0)
        expert = flat[order]
        starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
        rank = expert * capacity + (rank - starts[expert])
        row_token = torch.full((num_experts * capacity,), num_tokens, dtype=torch.long,
                               device=flat.device).index_copy_(0, rank, row_token)
    elif layout == "grouped_mm":
        offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
    slot = torch.empty_like(order).index_copy_(0, order, rank)
    if num_dropped:
        slot = slot.clamp_(max=routed)  # the dropped ranks trail the kept ones: all point one past the buffer
    return DispatchPlan(num_tokens, k, layout, counts, tokens_per_expert, slot.view(num_tokens, k), row_token,
                        num_dropped, capacity, offsets)


def dispatch_tokens(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Tokens ``x [T, D]`` -> expert buffer rows ``[R, D]`` (zero rows for padding)."""
    if plan.layout == "padded" and plan.num_rows > plan.slot.numel():
        x = torch.cat([x, x.new_zeros(1, x.shape[-1])])
    return x.index_select(0, plan.row_token)


def combine_tokens(out_rows: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``y[t] = sum_j weights[t, j] * out_rows[slot[t, j]]``: ``[R, D'], [T, k] -> [T, D']``; dropped ones add 0."""
    if plan.num_dropped:  # they point one past the buffer, at a zero row
        out_rows = torch.cat([out_rows, out_rows.new_zeros(1, out_rows.shape[-1])])
    return F.embedding_bag(plan.slot, out_rows, mode="sum", per_sample_weights=weights.to(out_rows.dtype))
