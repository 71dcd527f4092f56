"""Stacked expert MLPs evaluated on expert-sorted rows."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Type, Union

import torch
from torch import nn

from moemix.layers._validate import as_pair, check_bool, check_last_dim, check_positive_int, check_probability
from moemix.layers.activations import gated_activation, get_act_layer, recomputable
from moemix.layers.dispatch import DispatchPlan
from moemix.layers.expert_loop import expert_loop
from moemix.layers.grouped_gemm import grouped_matmul, grouped_mm_supported
from moemix.layers.routed_experts import RoutedExperts

__all__ = ["GroupedExperts"]


class GroupedExperts(RoutedExperts):
    """``E`` two-layer MLP experts with stacked weights.

    Expert ``e`` computes ``drop2(fc2_e(drop1(act(fc1_e(x)))))`` or, with ``glu=True`` (SwiGLU / GeGLU form,
    Shazeer 2020), ``drop2(fc2_e(drop1(act(gate_e(x)) * up_e(x))))``, as timm's ``Mlp`` and ``GluMlp``. Weights are stored stacked as
    ``w1 [E, in, hidden]`` (``[E, in, 2 * hidden]`` for GLU: gate then up), ``w2 [E, hidden, out]``,
    so all experts run through one :func:`~moemix.layers.grouped_gemm.grouped_matmul`.

    Args:
        num_experts: ``E``.
        in_features: input width ``D``.
        hidden_features: hidden width per expert ``H``.
        out_features: output width. Defaults to ``in_features``.
        act_layer: activation name (``"gelu"``, ``"silu"``, ...), module class or factory, or a module
            instance (copied). Built with the layer's ``device`` and ``dtype``. Defaults to GELU.
        bias: learn per-expert biases; a pair ``(first layer, second layer)`` sets them apart, as in
            timm's ``Mlp``. Defaults to True.
        glu: gated linear unit form. Defaults to False.
        drop: dropout after the activation and after the second layer; a pair sets them apart (timm
            ``Mlp``). Defaults to 0.

    Shapes:
        ``forward(rows [R, D], plan) -> [R, out]`` on the expert buffer of a
        :class:`~moemix.layers.DispatchPlan`; ``plan=None`` with a single expert runs every row through it
        (a dense FFN, as the shared expert of ``SparseMoE``).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        *,
        act_layer: Union[str, Type[nn.Module], Callable[[], nn.Module], nn.Module] = nn.GELU,
        bias: Union[bool, Tuple[bool, bool]] = True,
        glu: bool = False,
        drop: Union[float, Tuple[float, float]] = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        for name, value in (("num_experts", num_experts), ("in_features", in_features),
                            ("hidden_features", hidden_features), ("out_features", out_features)):
            check_positive_int(name, value)
        glu = check_bool("glu", glu)
        bias1, bias2 = as_pair("bias", bias, check_bool)
        drop1, drop2 = as_pair("drop", drop, check_probability)
        self.num_experts = num_experts
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        self.glu = glu
        dd = {"device": device, "dtype": dtype}
        fc1_out = 2 * hidden_features if glu else hidden_features
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, fc1_out, **dd))
        self.b1 = nn.Parameter(torch.empty(num_experts, fc1_out, **dd)) if bias1 else None
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **dd))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_features, **dd)) if bias2 else None
        self.act = get_act_layer(act_layer)().to(**{k: v for k, v in dd.items() if v is not None})  # PReLU, ...
        self.drop1 = nn.Dropout(drop1)
        self.drop2 = nn.Dropout(drop2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert initialised as an ``nn.Linear`` pair (uniform with bound 1/sqrt(fan_in))."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"hidden_features={self.hidden_features}, out_features={self.out_features}, glu={self.glu}, "
                f"bias={(self.b1 is not None, self.b2 is not None)}")

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear, experts: Optional[List[int]] = None,
                   fc1_up: Optional[nn.Linear] = None) -> None:
        """Copy a dense FFN (``nn.Linear`` fc1, fc2; for GLU also ``fc1_up``) into the given experts.

        For GLU experts ``fc1`` is the gate projection and ``fc1_up`` the up projection.
        """
        experts = range(self.num_experts) if experts is None else experts
        if self.glu and fc1_up is None:
            raise ValueError("GLU experts need fc1_up (the up projection) besides fc1 (the gate projection)")
        if not self.glu and fc1_up is not None:
            raise ValueError("fc1_up is only for GLU experts (glu=True)")
        d, h, out = self.in_features, self.hidden_features, self.out_features
        for name, layer, shape in (("fc1", fc1, (h, d)), ("fc1_up", fc1_up, (h, d)), ("fc2", fc2, (out, h))):
            if layer is not None and tuple(layer.weight.shape) != shape:
                raise ValueError(f"{name}.weight must have shape {shape} (nn.Linear(in, out) stores [out, in]), "
                                 f"got {tuple(layer.weight.shape)}")
        w1 = fc1.weight.t() if fc1_up is None else torch.cat([fc1.weight.t(), fc1_up.weight.t()], dim=-1)
        b1 = self._dense_bias("fc1", [layer for layer in (fc1, fc1_up) if layer is not None], self.b1)
        b2 = self._dense_bias("fc2", [fc2], self.b2)
        for param, value in ((self.w1, w1), (self.w2, fc2.weight.t()), (self.b1, b1), (self.b2, b2)):
            if param is not None:
                param[list(experts)] = value

    @staticmethod
    def _dense_bias(name: str, layers: List[nn.Linear], expert_bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The dense layers' biases side by side (zeros for a layer without one), for an expert bias; raises if
        the dense layers have a bias the experts cannot hold (the function would change)."""
        if all(layer.bias is None for layer in layers):
            return None if expert_bias is None else torch.zeros_like(expert_bias[0])
        if expert_bias is None:
            raise ValueError(f"{name} has a bias but the experts' layer has none; build them with a bias there "
                             "(bias=True or a (first, second) pair)")
        return torch.cat([layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
                          for layer in layers])

    def grouped_mm_ok(self, device_type: str, dtype: torch.dtype) -> bool:
        """Whether ``"auto"`` may run these experts in ``F.grouped_mm`` (CUDA, bfloat16/float16, 16-byte rows)."""
        widths = (self.in_features, self.w1.shape[-1], self.hidden_features, self.out_features)
        return grouped_mm_supported(device_type, dtype, widths)

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``y[t] = sum_j weights[t, j] * expert_{e(t, j)}(x[t])``. On CPU the sorted layout runs as one loop
        over the experts (:mod:`moemix.layers.expert_loop`: small per-expert temporaries, only the hidden
        activations kept) when the activation can be recomputed and no dropout is active."""
        dropout = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if plan.layout == "sorted" and x.device.type == "cpu" and recomputable(self.act) and not dropout:
            return expert_loop(x, weights, plan, self.act, self.glu, self.w1, self.b1, self.w2, self.b2)
        return super().forward_routed(x, weights, plan)

    def forward(self, rows: torch.Tensor, plan: Optional[DispatchPlan] = None) -> torch.Tensor:
        check_last_dim(type(self).__name__, rows, self.in_features)
        if plan is None and self.num_experts != 1:
            raise ValueError(f"plan may be None only with a single expert, this layer has "
                             f"num_experts={self.num_experts}")
        if plan is not None and plan.num_experts != self.num_experts:
            raise ValueError(f"plan must route to num_experts={self.num_experts} experts, it has {plan.num_experts}")
        h = grouped_matmul(rows, self.w1, plan, self.b1)
        h = self.drop1(gated_activation(h, self.act) if self.glu else self.act(h))
        return self.drop2(grouped_matmul(h, self.w2, plan, self.b2))
