"""SparseMoE: router + grouped experts + the shared dropless dispatch, a drop-in for ``timm.layers.Mlp``."""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Type, Union

from torch import nn

from moemix.layers._validate import check_choice, check_nonnegative, check_positive_int
from moemix.layers.experts import GroupedExperts
from moemix.layers.moe_layer import AUX_LOSS_TYPES, MoELayer, check_layer_options
from moemix.layers.router import TopKRouter

__all__ = ["SparseMoE", "AUX_LOSS_TYPES", "SHARED_EXPERT_TYPES"]

SHARED_EXPERT_TYPES = (None, "gated", "averaged")


class SparseMoE(MoELayer):
    """Sparse mixture-of-experts feed-forward layer.

    Tokens ``x [..., D]`` are routed by a :class:`TopKRouter` to ``k`` of ``E`` MLP experts
    (:class:`GroupedExperts`) and their outputs are combined with the router weights:
    ``y = sum_j w_j * expert_{i_j}(x)``. Dropless by default (every assignment is computed); with
    ``capacity_factor`` the overflow is dropped and counted (Switch/GShard). It is a
    :class:`~moemix.layers.MoELayer` with these parts built from ``timm.layers.Mlp`` keywords; build a
    ``MoELayer`` directly for a router or experts of one's own.

    After each forward the module holds ``aux_loss`` (weighted auxiliary loss, a scalar with gradient),
    ``aux_losses`` (its detached named parts), ``tokens_per_expert`` (``[E]``) and ``dropped_tokens`` (dropped
    assignments, token-expert pairs: up to ``T * k``);
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
        dispatch_layout: dispatch strategy, ``"auto"``, ``"sorted"``, ``"padded"`` or
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
        check_choice("shared_expert", shared_expert, SHARED_EXPERT_TYPES)
        check_layer_options(aux_loss, aux_loss_coef, z_loss_coef, dispatch_layout, capacity_factor)  # before allocating
        if shared_expert is not None:
            check_positive_int("shared_hidden_features", shared_hidden_features)
        dd = {"device": device, "dtype": dtype}
        router = TopKRouter(in_features, num_experts, k, score=score, noise=noise, noise_eps=noise_eps,
                            renormalize=renormalize, capacity_factor=capacity_factor, init_std=router_init_std, **dd)
        experts = GroupedExperts(num_experts, in_features, hidden_features, out_features, act_layer=act_layer,
                                 bias=bias, glu=glu, drop=drop, **dd)
        shared, shared_gate = None, None
        if shared_expert is not None:
            shared = GroupedExperts(1, in_features, shared_hidden_features, out_features, act_layer=act_layer,
                                    bias=bias, glu=glu, drop=drop, **dd)
            shared_gate = nn.Linear(in_features, 1, bias=False, **dd) if shared_expert == "gated" else None
        super().__init__(router, experts, aux_loss=aux_loss, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                         shared_expert=shared, shared_gate=shared_gate, dispatch_layout=dispatch_layout)
        self.shared_expert_type = shared_expert
