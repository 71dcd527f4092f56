"""The interface of the experts an MoE layer routes tokens to: plan the dispatch, run the routed rows."""
from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

from moemix.layers.dispatch import DispatchPlan, combine_tokens, dispatch_tokens, plan_dispatch
from moemix.layers.recycled_buffers import RecycledPool
from moemix.layers.router import RoutingDecision

__all__ = ["RoutedExperts"]


class RoutedExperts(nn.Module):
    """Base class of a set of experts behind :class:`~moemix.layers.MoELayer` (and so ``SparseMoE``).

    A subclass sets ``num_experts``, ``in_features`` and ``out_features`` and implements ``forward`` on the
    expert buffer that :func:`~moemix.layers.dispatch_tokens` builds::

        forward(rows [R, D], counts, capacity=None, offsets=None) -> [R, D']

    ``rows`` are sorted by expert, ``counts[e]`` (host ints) rows for expert ``e``; with ``capacity`` every
    expert owns ``capacity`` rows (padded layout; the padding rows are zero and their outputs are never
    read). In capacity mode the dropped assignments' rows (zero) trail the last expert's; the base class
    replaces their outputs by zeros, so ``forward`` may leave anything there. ``offsets`` (``[E]`` int32
    slice ends, ``"grouped_mm"`` layout) may be ignored: the rows are the sorted ones. ``forward`` must
    return one output row per input row. Everything else comes from this class: :meth:`plan_routing` sorts
    the router's assignments by expert (one host sync) and :meth:`forward_routed` gathers the rows, runs
    ``forward`` and sums each token's expert outputs with its router weights. A subclass with a faster path
    overrides those two (:class:`~moemix.layers.GroupedExperts`: its fused per-expert loop, and an
    ``"auto"`` rule that weighs the experts' size); one that overrides ``forward_routed`` need not implement
    ``forward`` at all. :meth:`select_experts` cuts out a subset of the experts (expert parallelism,
    :func:`moemix.parallel.shard_experts`, which runs the rows a rank receives through ``plan_routing`` and
    ``forward_routed`` too).

    Example (linear experts, one ``[D, D']`` matrix each):
        >>> from moemix.layers import MoELayer, TopKRouter, grouped_matmul
        >>> class LinearExperts(RoutedExperts):
        ...     def __init__(self, num_experts, in_features, out_features):
        ...         super().__init__()
        ...         self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        ...         self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features) / in_features ** 0.5)
        ...     def forward(self, rows, counts, capacity=None, offsets=None):
        ...         return grouped_matmul(rows, self.weight, counts, capacity=capacity)
        >>> layer = MoELayer(TopKRouter(16, num_experts=4, k=2), LinearExperts(4, 16, 32))
        >>> layer(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 32])
    """

    num_experts: int
    in_features: int
    out_features: int
    _row_pool: Optional[RecycledPool] = None  # recycled dispatch/combine temporaries (CPU), if a subclass keeps one

    def plan_routing(self, x: torch.Tensor, decision: RoutingDecision, layout: str = "auto") -> DispatchPlan:
        """The dispatch plan for tokens ``x [T, D]`` routed by ``decision`` in ``layout``
        (:func:`~moemix.layers.plan_dispatch`; ``"auto"`` weighs rows per expert only, and ``"loop"`` plans
        the sorted buffer unless ``forward_routed`` runs a loop of its own)."""
        return plan_dispatch(decision.indices, self.num_experts, decision.kept, layout)

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_{e(t, j)}(x[t])`` for tokens ``x [T, D]``, ``weights [T, k]``."""
        rows = dispatch_tokens(x, plan, self._row_pool)
        return combine_tokens(self.expert_rows(rows, plan), weights, plan, self._row_pool)

    def expert_rows(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``forward`` on the expert buffer ``rows [R, D]`` -> ``[R, D']``, its row count checked and the
        dropped assignments' outputs replaced by zeros (a subclass whose ``forward`` leaves zeros there may
        skip that)."""
        out_rows = self.check_output_rows(self(rows, plan.counts, plan.capacity, plan.offsets), rows)
        if plan.num_dropped:  # whatever forward left in the dropped rows, they add nothing
            routed = rows.shape[0] - plan.num_dropped
            out_rows = torch.cat([out_rows[:routed], out_rows.new_zeros(plan.num_dropped, out_rows.shape[1])])
        return out_rows

    def check_output_rows(self, out_rows: torch.Tensor, rows: torch.Tensor, method: str = "forward") -> torch.Tensor:
        """``out_rows`` if ``method`` returned one row per row of ``rows`` (2-D), else ``ValueError``."""
        if out_rows.dim() != 2 or out_rows.shape[0] != rows.shape[0]:
            raise ValueError(f"{type(self).__name__}.{method} must return [rows, out_features] = "
                             f"[{rows.shape[0]}, {self.out_features}], got {tuple(out_rows.shape)}")
        return out_rows

    def select_experts(self, start: int, stop: int) -> "RoutedExperts":
        """A copy of these experts holding only experts ``start ... stop - 1`` (renumbered from 0).

        The default slices every parameter and buffer registered on this module itself along its first
        dimension, which must be ``num_experts`` (stacked ``[E, ...]`` tensors, as in ``GroupedExperts``), and
        copies everything else whole (flags, plain tensor attributes, submodules without parameters or
        buffers such as the activation); the full stack is never duplicated and no random numbers are drawn.
        Experts holding other state (a submodule with weights or buffers, an ``nn.ModuleList`` of experts, a
        weight shared by all experts) raise ``ValueError``: their class must override this method, returning
        experts whose every parameter and buffer belongs to the selected experts alone.
        """
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= self.num_experts):
            raise ValueError(f"select_experts needs 0 <= start < stop <= num_experts={self.num_experts}, "
                             f"got start={start!r}, stop={stop!r}")
        kind = type(self).__name__
        for child_name, child in self.named_children():
            for what, named in (("parameter", child.named_parameters()), ("buffer", child.named_buffers())):
                for name, _ in named:
                    raise ValueError(f"{kind}.select_experts cannot split the {what} {child_name}.{name} (a "
                                     f"submodule's); override select_experts in {kind}")
        memo = {}
        for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            if tensor is None:
                continue
            if tensor.dim() == 0 or tensor.shape[0] != self.num_experts:
                raise ValueError(f"{kind}.select_experts needs every parameter and buffer stacked as "
                                 f"[num_experts={self.num_experts}, ...], {name} has shape {tuple(tensor.shape)}; "
                                 f"override select_experts in {kind}")
            piece = tensor.detach()[start:stop].clone()
            memo[id(tensor)] = (nn.Parameter(piece, requires_grad=tensor.requires_grad)
                                if isinstance(tensor, nn.Parameter) else piece)
        selected = copy.deepcopy(self, memo)
        selected.num_experts = stop - start
        return selected

    def forward(self, rows: torch.Tensor, counts: List[int], capacity: Optional[int] = None,
                offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(rows, counts, capacity=None, "
                                  "offsets=None) on the expert buffer")
