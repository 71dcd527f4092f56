"""MoELayer: any router + any routed experts + the shared dispatch, auxiliary losses and routing statistics."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from moemix.layers._validate import check_choice, check_last_dim, check_nonnegative
from moemix.layers.dispatch import LAYOUTS
from moemix.layers.router import RoutingDecision
from moemix.losses import importance_load_loss, load_balance_from_counts, load_balance_loss, router_z_loss

__all__ = ["MoELayer", "AUX_LOSS_TYPES", "check_layer_options"]

AUX_LOSS_TYPES = ("switch", "importance", None)


def check_layer_options(aux_loss: Optional[str], aux_loss_coef: float, z_loss_coef: float, dispatch_layout: str,
                        capacity_factor: Optional[float]) -> None:
    """``ValueError`` for MoELayer options out of range (``capacity_factor``: the router's)."""
    check_choice("aux_loss", aux_loss, AUX_LOSS_TYPES)
    check_nonnegative("aux_loss_coef", aux_loss_coef)
    check_nonnegative("z_loss_coef", z_loss_coef)
    check_choice("dispatch_layout", dispatch_layout, LAYOUTS)
    if dispatch_layout in ("padded", "grouped_mm") and capacity_factor is not None:
        raise ValueError(f"dispatch_layout={dispatch_layout!r} cannot hold the assignments a capacity_factor "
                         "drops; use 'auto' or 'sorted' with capacity_factor")


def _check_parts(router: nn.Module, experts: nn.Module, shared_expert: Optional[nn.Module],
                 shared_gate: Optional[nn.Module]) -> None:
    for name, part in (("router", router), ("experts", experts)):
        if not isinstance(part, nn.Module):
            raise ValueError(f"{name} must be an nn.Module, got {type(part).__name__}")
    for name in ("num_experts", "k"):
        if not isinstance(getattr(router, name, None), int):
            raise ValueError(f"router must have an int attribute {name!r} (TopKRouter or a subclass)")
    for name in ("num_experts", "in_features", "out_features", "plan_routing", "forward_routed"):
        if not hasattr(experts, name):
            raise ValueError(f"experts must have {name!r} (a RoutedExperts subclass), {type(experts).__name__} "
                             "has not")
    if experts.num_experts != router.num_experts:
        raise ValueError(f"experts.num_experts must equal router.num_experts={router.num_experts}, "
                         f"got {experts.num_experts}")
    router_in = getattr(router, "in_features", experts.in_features)
    if experts.in_features != router_in:
        raise ValueError(f"experts.in_features must equal router.in_features={router_in}, got {experts.in_features}")
    if shared_gate is not None and shared_expert is None:
        raise ValueError("shared_gate applies only with a shared_expert")
    for name, part in (("shared_expert", shared_expert), ("shared_gate", shared_gate)):
        if part is not None and not isinstance(part, nn.Module):
            raise ValueError(f"{name} must be an nn.Module or None, got {type(part).__name__}")
    for name, want in (("in_features", experts.in_features), ("out_features", experts.out_features)):
        have = getattr(shared_expert, name, want)
        if have != want:
            raise ValueError(f"shared_expert.{name} must equal experts.{name}={want}, got {have}")


class MoELayer(nn.Module):
    """Mixture-of-experts layer from parts: ``y = sum_j w_j * expert_{i_j}(x)``.

    The router (:class:`~moemix.layers.TopKRouter` or a subclass, e.g. one that overrides
    ``gate_logits`` to score experts its own way) decides ``k`` experts and weights per token; the
    experts (a :class:`~moemix.layers.RoutedExperts`: :class:`~moemix.layers.GroupedExperts` or one's own)
    plan the dispatch and run the routed tokens. This class adds what every MoE layer needs around them:
    the ``[..., D]`` shape handling, the optional shared expert, and after each forward ``aux_loss``
    (weighted auxiliary loss, a scalar with gradient, summed over a model by
    :func:`moemix.losses.collect_aux_loss`), ``aux_losses`` (its detached named parts),
    ``tokens_per_expert`` (``[E]``, assignments per expert) and ``dropped_tokens`` (assignments over capacity:
    token-expert pairs, up to ``T * k``). :class:`~moemix.layers.SparseMoE` is this layer
    with a ``TopKRouter`` and MLP ``GroupedExperts`` built from ``timm.layers.Mlp`` keywords.

    Args:
        router: maps tokens ``[T, D]`` to a :class:`~moemix.layers.RoutingDecision`; has ``num_experts``
            and ``k``.
        experts: :class:`~moemix.layers.RoutedExperts` with the router's ``num_experts`` and ``in_features``.
        aux_loss: ``"switch"`` (load-balance), ``"importance"`` (importance + load cv^2) or None.
            Defaults to ``"switch"``.
        aux_loss_coef: weight of that loss. Defaults to 1e-2 (ST-MoE).
        z_loss_coef: weight of the router z-loss. Defaults to 1e-3 (ST-MoE).
        shared_expert: optional dense expert ``[T, D] -> [T, D']`` every token goes through; the output is
            ``(moe(x) + shared(x)) / 2`` (GNT-MOVE permanent expert) or, with ``shared_gate``,
            ``moe(x) + sigmoid(shared_gate(x)) * shared(x)`` (Qwen2-MoE).
        shared_gate: ``[T, D] -> [T, 1]`` gate of the shared expert (e.g. ``nn.Linear(D, 1, bias=False)``).
        dispatch_layout: ``"auto"``, ``"sorted"``, ``"padded"`` or ``"grouped_mm"``, handed to
            ``experts.plan_routing`` (see :mod:`moemix.layers.dispatch`); only speed depends on it, except
            that ``"padded"`` and ``"grouped_mm"`` refuse dropped assignments (a router with a capacity) and
            ``"grouped_mm"`` needs experts that can run it (``GroupedExperts``: float32/bfloat16/float16,
            16-byte rows). Defaults to ``"auto"``.

    Shapes:
        ``[..., D] -> [..., D']``.

    Example:
        >>> from moemix.layers import GroupedExperts, TopKRouter
        >>> layer = MoELayer(TopKRouter(64, num_experts=4, k=2), GroupedExperts(4, 64, 128, act_layer="silu", glu=True))
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
        >>> layer.tokens_per_expert.sum().item()
        40
    """

    def __init__(self, router: nn.Module, experts: nn.Module, *, aux_loss: Optional[str] = "switch",
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 1e-3, shared_expert: Optional[nn.Module] = None,
                 shared_gate: Optional[nn.Module] = None, dispatch_layout: str = "auto"):
        super().__init__()
        _check_parts(router, experts, shared_expert, shared_gate)
        check_layer_options(aux_loss, aux_loss_coef, z_loss_coef, dispatch_layout,
                            getattr(router, "capacity_factor", None))
        self.in_features = experts.in_features
        self.out_features = experts.out_features
        self.dispatch_layout = dispatch_layout
        self.router = router
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_gate = shared_gate
        self.aux_loss_type = aux_loss
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.aux_loss: Optional[torch.Tensor] = None
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.dropped_tokens: int = 0

    def __getstate__(self):
        # Per-forward state is not part of the module: aux_loss may hold an autograd graph, which
        # copy.deepcopy (EMA, checkpoint averaging) and pickling cannot take.
        state = super().__getstate__().copy()
        state.update(aux_loss=None, aux_losses={})
        return state

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def k(self) -> int:
        return self.router.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        param = next(self.experts.parameters(), None)
        check_last_dim(type(self).__name__, x, self.in_features, None if param is None else param.dtype)
        lead_shape = x.shape[:-1]
        if x.is_meta:  # shape inference: routing needs values
            self.aux_loss = x.new_zeros(())
            return x.new_empty(*lead_shape, self.out_features)
        tokens = x.reshape(-1, self.in_features)
        decision = self.router(tokens)
        y = self._experts_forward(tokens, decision)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_gate is not None:
                y = y + torch.sigmoid(self.shared_gate(tokens)) * shared
            else:
                y = (y + shared) / 2
        self._store_aux(decision)
        return y.reshape(*lead_shape, self.out_features)

    @torch.compiler.disable
    def _experts_forward(self, tokens: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        # Data-dependent slice sizes: run eagerly under torch.compile (one graph break).
        plan = self.experts.plan_routing(tokens, decision, self.dispatch_layout)
        self.tokens_per_expert = plan.tokens_per_expert.detach()
        self.dropped_tokens = plan.num_dropped
        return self.experts.forward_routed(tokens, decision.weights, plan)

    def _store_aux(self, decision: RoutingDecision) -> None:
        parts: Dict[str, Tuple[torch.Tensor, float]] = {}  # name -> (loss, coefficient)
        if self.aux_loss_type == "switch":
            assignments = decision.indices.numel()
            # Without a capacity the plan counted exactly the router's assignments: no second count.
            if decision.kept is None and assignments and self.tokens_per_expert is not None:
                loss = load_balance_from_counts(decision.probs, self.tokens_per_expert, assignments)
            else:
                loss = load_balance_loss(decision.probs, decision.indices)
            parts["loss_balance"] = (loss, self.aux_loss_coef)
        elif self.aux_loss_type == "importance":
            loss = importance_load_loss(decision.probs, decision.indices, weights=decision.weights)
            parts["loss_importance_load"] = (loss, self.aux_loss_coef)
        if self.z_loss_coef > 0:
            parts["loss_z"] = (router_z_loss(decision.logits), self.z_loss_coef)
        self.aux_loss = decision.logits.new_zeros(())
        for value, coef in parts.values():
            self.aux_loss = torch.add(self.aux_loss, value, alpha=coef)
        self.aux_losses = {name: value.detach() for name, (value, _) in parts.items()}
