"""The interface of the experts an MoE layer routes tokens to: plan the dispatch, run the routed rows."""
from __future__ import annotations

import copy

import torch
from torch import nn

from moemix.layers.dispatch import DispatchPlan, combine_tokens, dispatch_tokens, plan_dispatch
from moemix.layers.grouped_gemm import autocast_dtype
from moemix.layers.router import RoutingDecision

__all__ = ["RoutedExperts"]


class RoutedExperts(nn.Module):
    """Base class of a set of experts behind :class:`~moemix.layers.MoELayer` (and so ``SparseMoE``).

    A subclass sets ``num_experts``, ``in_features`` and ``out_features`` and implements one method::

        forward(rows [R, D], plan) -> [R, D']

    ``rows`` is the expert buffer of ``plan`` (a :class:`~moemix.layers.DispatchPlan`): rows sorted by expert,
    ``plan.counts[e]`` of them for expert ``e`` (or ``plan.capacity`` each in the padded layout, padding rows
    zero). :func:`~moemix.layers.grouped_matmul` runs stacked ``[E, in, out]`` weights on it in any layout,
    so most experts need nothing else. Everything around it comes from this class: :meth:`plan_routing`
    sorts the router's assignments by expert (one host sync) and :meth:`forward_routed` gathers the rows,
    runs ``forward`` and sums each token's expert outputs with its router weights. Experts that can run
    ``F.grouped_mm`` say so in :meth:`grouped_mm_ok`. :meth:`select_experts` cuts out a subset of the experts
    (expert parallelism, :func:`moemix.parallel.shard_experts`).

    Example (linear experts, one ``[D, D']`` matrix each):
        >>> from moemix.layers import MoELayer, TopKRouter, grouped_matmul
        >>> class LinearExperts(RoutedExperts):
        ...     def __init__(self, num_experts, in_features, out_features):
        ...         super().__init__()
        ...         self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        ...         self.weight = nn.Parameter(torch.randn(num_experts, in_features, out_features) / in_features ** 0.5)
        ...     def forward(self, rows, plan):
        ...         return grouped_matmul(rows, self.weight, plan)
        >>> layer = MoELayer(TopKRouter(16, num_experts=4, k=2), LinearExperts(4, 16, 32))
        >>> layer(torch.randn(3, 5, 16)).shape
        torch.Size([3, 5, 32])
    """

    num_experts: int
    in_features: int
    out_features: int

    def grouped_mm_ok(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether ``"auto"`` may run these experts in the grouped_mm layout (here: never)."""
        return False

    def plan_routing(self, x: torch.Tensor, decision: RoutingDecision, layout: str = "auto") -> DispatchPlan:
        """The dispatch plan for tokens ``x [T, D]`` routed by ``decision`` (:func:`~moemix.layers.plan_dispatch`)."""
        dtype = autocast_dtype(x.device.type) or x.dtype
        grouped_mm_ok = layout == "auto" and self.grouped_mm_ok(x.device.type, dtype)
        return plan_dispatch(decision.indices, self.num_experts, decision.kept, layout, grouped_mm_ok)

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_{e(t, j)}(x[t])`` for tokens ``x [T, D]``, ``weights [T, k]``."""
        rows = dispatch_tokens(x, plan)
        return combine_tokens(self.check_output_rows(self(rows, plan), rows), weights, plan)

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

    def forward(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(rows, plan) on the expert buffer")
