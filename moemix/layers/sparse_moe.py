"""SparseMoE: router + grouped experts + the shared dropless dispatch, a drop-in for ``timm.layers.Mlp``."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type, Union

import torch
from torch import nn

from moemix.layers._validate import check_choice, check_last_dim, check_nonnegative, check_positive_int
from moemix.layers.dispatch import LAYOUTS, plan_dispatch
from moemix.layers.experts import GroupedExperts
from moemix.layers.router import RoutingDecision, TopKRouter
from moemix.losses import importance_load_loss, load_balance_from_counts, load_balance_loss, router_z_loss

__all__ = ["SparseMoE", "AUX_LOSS_TYPES", "SHARED_EXPERT_TYPES"]

AUX_LOSS_TYPES = ("switch", "importance", None)
SHARED_EXPERT_TYPES = (None, "gated", "averaged")


class SparseMoE(nn.Module):
    """Sparse mixture-of-experts feed-forward layer.

    Tokens ``x [..., D]`` are routed by a :class:`TopKRouter` to ``k`` of ``E`` MLP experts
    (:class:`GroupedExperts`) and their outputs are combined with the router weights:
    ``y = sum_j w_j * expert_{i_j}(x)``. Dropless by default (every assignment is computed); with
    ``capacity_factor`` the overflow is dropped and counted (Switch/GShard).

    After each forward the module holds ``aux_loss`` (weighted auxiliary loss, a scalar with gradient),
    ``aux_losses`` (its detached named parts), ``tokens_per_expert`` (``[E]``) and ``dropped_tokens``;
    :func:`moemix.losses.collect_aux_loss` sums ``aux_loss`` over a model.

    References: Shazeer et al. 2017; Lepikhin et al. 2020 (GShard); Fedus et al. 2021 (Switch);
    Jiang et al. 2024 (Mixtral); Gale et al. 2022 (megablocks, dropless dispatch); Qwen2-MoE (gated
    shared expert); Cong et al. 2023 (GNT-MOVE, averaged permanent expert).

    Args:
        in_features: token width ``D``.
        hidden_features: hidden width of each expert. Defaults to ``in_features``.
        out_features: output width. Defaults to ``in_features``.
        act_layer: activation name, module class or factory, or a module instance (each layer gets a
            copy). Defaults to GELU.
        norm_layer: must be None (accepted for ``timm.layers.Mlp`` signature compatibility).
        bias: expert biases; a pair ``(first layer, second layer)`` as in timm's ``Mlp``. Defaults to True.
        drop: dropout inside the experts (after the activation, after the second layer); a pair as in
            timm's ``Mlp``. Defaults to 0.
        use_conv: must be False (``timm.layers.Mlp`` compatibility).
        num_experts: ``E``. Defaults to 8.
        k: experts per token. Defaults to 2.
        glu: gated (SwiGLU-style) experts. Defaults to False.
        score, noise, noise_eps, renormalize, capacity_factor, router_init_std: see :class:`TopKRouter`.
        aux_loss: ``"switch"`` (load-balance), ``"importance"`` (importance + load cv^2) or None.
            Defaults to ``"switch"``.
        aux_loss_coef: weight of that loss. Defaults to 1e-2 (ST-MoE).
        z_loss_coef: weight of the router z-loss. Defaults to 1e-3 (ST-MoE).
        shared_expert: None; ``"gated"`` adds ``sigmoid(g(x)) * shared(x)`` (Qwen2-MoE); ``"averaged"``
            returns ``(moe(x) + shared(x)) / 2`` (GNT-MOVE permanent expert). Defaults to None.
        shared_hidden_features: hidden width of the shared expert. Defaults to ``hidden_features``.
        dispatch_layout: dispatch strategy, ``"auto"``, ``"loop"``, ``"sorted"``, ``"padded"`` or
            ``"grouped_mm"`` (see :mod:`moemix.layers.dispatch`); the result is the same, only speed differs.
            ``"padded"`` and ``"grouped_mm"`` cannot hold dropped assignments, so they are refused with
            ``capacity_factor``. Defaults to "auto".

    Shapes:
        ``[..., in_features] -> [..., out_features]``.

    Example:
        >>> moe = SparseMoE(64, 128, num_experts=4, k=2)
        >>> moe(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
        >>> moe.tokens_per_expert.sum().item()
        40
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module], nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        use_conv: bool = False,
        *,
        num_experts: int = 8,
        k: int = 2,
        glu: bool = False,
        score: str = "softmax",
        noise: Optional[str] = None,
        noise_eps: Optional[float] = None,
        renormalize: Optional[bool] = None,
        capacity_factor: Optional[float] = None,
        router_init_std: Optional[float] = None,
        aux_loss: Optional[str] = "switch",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        shared_expert: Optional[str] = None,
        shared_hidden_features: Optional[int] = None,
        dispatch_layout: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if norm_layer is not None:
            raise ValueError("norm_layer is not supported inside SparseMoE experts; pass norm_layer=None")
        if use_conv:
            raise ValueError("use_conv=True is not supported by SparseMoE; it works on [..., D] tokens")
        if shared_hidden_features is not None and shared_expert is None:
            raise ValueError("shared_hidden_features applies only with a shared_expert ('gated' or 'averaged')")
        if router_init_std is not None:
            check_nonnegative("router_init_std", router_init_std)
        hidden_features = in_features if hidden_features is None else hidden_features
        out_features = in_features if out_features is None else out_features
        shared_hidden_features = hidden_features if shared_hidden_features is None else shared_hidden_features
        check_positive_int("in_features", in_features)
        check_positive_int("hidden_features", hidden_features)
        check_positive_int("out_features", out_features)
        check_choice("aux_loss", aux_loss, AUX_LOSS_TYPES)
        check_choice("shared_expert", shared_expert, SHARED_EXPERT_TYPES)
        check_nonnegative("aux_loss_coef", aux_loss_coef)
        check_nonnegative("z_loss_coef", z_loss_coef)
        check_choice("dispatch_layout", dispatch_layout, LAYOUTS)
        if dispatch_layout in ("padded", "grouped_mm") and capacity_factor is not None:
            raise ValueError(f"dispatch_layout={dispatch_layout!r} cannot hold the assignments a capacity_factor "
                             "drops; use 'auto', 'loop' or 'sorted' with capacity_factor")
        if shared_expert is not None:
            check_positive_int("shared_hidden_features", shared_hidden_features)
        self.dispatch_layout = dispatch_layout
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.router = TopKRouter(in_features, num_experts, k, score=score, noise=noise, noise_eps=noise_eps,
                                 renormalize=renormalize, capacity_factor=capacity_factor,
                                 init_std=router_init_std, **dd)
        self.experts = GroupedExperts(num_experts, in_features, hidden_features, out_features, act_layer=act_layer,
                                      bias=bias, glu=glu, drop=drop, **dd)
        self.shared_expert_type = shared_expert
        if shared_expert is not None:
            self.shared_expert = GroupedExperts(1, in_features, shared_hidden_features,
                                                out_features, act_layer=act_layer, bias=bias, glu=glu, drop=drop, **dd)
            self.shared_gate = nn.Linear(in_features, 1, bias=False, **dd) if shared_expert == "gated" else None
        else:
            self.shared_expert = None
            self.shared_gate = None
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
        check_last_dim(type(self).__name__, x, self.in_features)
        lead_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.in_features)
        decision = self.router(tokens)
        y = self._experts_forward(tokens, decision)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens, [tokens.shape[0]])
            if self.shared_gate is not None:
                y = y + torch.sigmoid(self.shared_gate(tokens)) * shared
            else:
                y = (y + shared) / 2
        self._store_aux(decision)
        return y.reshape(*lead_shape, self.out_features)

    @torch.compiler.disable
    def _experts_forward(self, tokens: torch.Tensor, decision: RoutingDecision) -> torch.Tensor:
        # Data-dependent slice sizes: run eagerly under torch.compile (one graph break).
        auto = self.dispatch_layout == "auto"
        grouped_mm_ok = auto and self.experts.grouped_mm_pays_off(tokens)
        loop_gemm = self.experts.loop_gemm(tokens) if auto else "onednn"
        plan = plan_dispatch(decision.indices, self.num_experts, decision.kept, self.dispatch_layout,
                             self.experts.in_features * self.experts.w1.shape[-1], grouped_mm_ok, loop_gemm)
        self.tokens_per_expert = plan.tokens_per_expert.detach()
        self.dropped_tokens = plan.num_dropped
        return self.experts.forward_routed(tokens, decision.weights, plan)

    def _store_aux(self, decision: RoutingDecision) -> None:
        parts: Dict[str, torch.Tensor] = {}
        coefs: Dict[str, float] = {}
        if self.aux_loss_type == "switch":
            assignments = decision.indices.numel()
            # Without a capacity the plan counted exactly the router's assignments: no second count.
            if decision.kept is None and assignments and self.tokens_per_expert is not None:
                parts["loss_balance"] = load_balance_from_counts(decision.probs, self.tokens_per_expert, assignments)
            else:
                parts["loss_balance"] = load_balance_loss(decision.probs, decision.indices)
            coefs["loss_balance"] = self.aux_loss_coef
        elif self.aux_loss_type == "importance":
            parts["loss_importance_load"] = importance_load_loss(decision.probs, decision.indices,
                                                                 weights=decision.weights)
            coefs["loss_importance_load"] = self.aux_loss_coef
        if self.z_loss_coef > 0:
            parts["loss_z"] = router_z_loss(decision.logits)
            coefs["loss_z"] = self.z_loss_coef
        total = None
        for name, value in parts.items():
            total = value * coefs[name] if total is None else torch.add(total, value, alpha=coefs[name])
        self.aux_loss = decision.logits.new_zeros(()) if total is None else total
        self.aux_losses = {name: value.detach() for name, value in parts.items()}
