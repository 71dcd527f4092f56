"""MixLoRA (Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of
Experts"; reference code TUDB-Labs/MixLoRA): LoRA experts on one frozen pretrained FFN.

The base FFN's first projections run once for all tokens; each expert adds its LoRA deltas on the rows routed
to it only::

    gated:  h_e = act(W_g x + s B_ge A_ge x) * (W_u x + s B_ue A_ue x)      plain:  h_e = act(W_1 x + s B_1e A_1e x)
    y = sum_k w_k (W_d h_e + s B_de A_de h_e)          (s = alpha / r, LoRA dropout on every adapter input)

The router is the library's :class:`~moemix.layers.TopKRouter` (Mixtral-style softmax, top-k, renormalised,
gate initialised with std 0.02) and the dispatch the library's plan: the second projection ``W_d`` is shared,
so it runs as one dense GEMM over all routed rows; only the LoRA factors run per expert.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import nn

from moemix._checks import check_nonnegative, check_positive, check_positive_int, check_probability
from moemix.adapters.ffn import FFNParts, ffn_parts
from moemix.layers.dispatch import DispatchPlan, combine_tokens, dispatch_tokens
from moemix.layers.grouped_gemm import grouped_matmul
from moemix.layers.moe_layer import MoELayer
from moemix.layers.routed_experts import RoutedExperts
from moemix.layers.router import TopKRouter

__all__ = ["MixLoRA", "MixLoRAExperts"]


class _ExpertRows(torch.autograd.Function):
    """``t[row_token[slice_e]]`` for each expert's slice of the sorted rows, with one ``[T, ...]`` gradient for all
    of them (stock autograd of per-expert gathers would zero-fill a full-size gradient per expert)."""

    @staticmethod
    def forward(ctx, t, row_token, counts):
        ctx.save_for_backward(row_token)
        ctx.shape, ctx.counts = t.shape, counts
        return tuple(t.index_select(0, tokens) for tokens in row_token.split(counts))

    @staticmethod
    def backward(ctx, *grads):
        (row_token,) = ctx.saved_tensors
        grad = None
        for tokens, g in zip(row_token.split(ctx.counts), grads):
            if g is not None:
                grad = grad if grad is not None else g.new_zeros(ctx.shape)
                grad.index_add_(0, tokens, g)
        return grad, None, None


class MixLoRAExperts(RoutedExperts):
    """``E`` LoRA experts sharing one frozen FFN (``ffn``, kept as a submodule with ``requires_grad=False``).

    Each adapted projection ``p`` (``gate``, ``up`` for gated FFNs, ``down``) has stacked factors
    ``lora_A_p [E, in_p, r]`` (Kaiming-uniform per expert, as ``nn.Linear(in, r)``) and ``lora_B_p [E, r, out_p]``
    (zeros), so a fresh layer computes the base FFN exactly.
    """

    def __init__(self, ffn: nn.Module, num_experts: int = 8, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05):
        super().__init__()
        check_positive_int("num_experts", num_experts)
        check_positive_int("r", r)
        check_positive("alpha", alpha)
        check_probability("dropout", dropout)
        self.ffn = ffn.requires_grad_(False)
        parts = self.parts
        self.num_experts, self.r, self.alpha, self.scaling = num_experts, r, float(alpha), float(alpha) / r
        self.in_features, self.out_features = parts.in_features, parts.out_features
        self.lora_dropout = nn.Dropout(dropout)
        dd = {"device": parts.gate.weight.device, "dtype": parts.gate.weight.dtype}
        for name, layer in self._projections(parts).items():
            a = torch.empty(num_experts, layer.in_features, r, **dd)
            for e in range(num_experts):  # nn.Linear(in, r)'s init, transposed
                nn.init.kaiming_uniform_(a[e].T, a=math.sqrt(5))
            self.register_parameter(f"lora_A_{name}", nn.Parameter(a))
            b = torch.zeros(num_experts, r, layer.out_features, **dd)
            self.register_parameter(f"lora_B_{name}", nn.Parameter(b))

    @property
    def parts(self) -> FFNParts:
        return ffn_parts(self.ffn)

    @staticmethod
    def _projections(parts: FFNParts) -> Dict[str, nn.Linear]:
        found = {"gate": parts.gate, "up": parts.up, "down": parts.down}
        return {name: layer for name, layer in found.items() if layer is not None}

    def _lora(self, name: str, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``s * B A dropout(x)`` of each row's expert, for the expert buffer ``x`` of ``plan``."""
        a, b = getattr(self, f"lora_A_{name}"), getattr(self, f"lora_B_{name}")
        return grouped_matmul(grouped_matmul(self.lora_dropout(x), a, plan), b, plan) * self.scaling

    def _lora_of_expert(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``s * B_e A_e dropout(x)`` for rows ``x`` of expert ``e``."""
        a, b = getattr(self, f"lora_A_{name}")[expert], getattr(self, f"lora_B_{name}")[expert]
        return self.lora_dropout(x) @ a @ b * self.scaling

    @staticmethod
    def _expert_outputs(parts: FFNParts, x_rows: torch.Tensor, gate_rows: torch.Tensor, up_rows: Optional[torch.Tensor],
                        lora: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The experts on rows whose base first projections are given; ``lora(projection, input)``: the deltas."""
        h = parts.act(gate_rows + lora("gate", x_rows))
        if up_rows is not None:
            h = h * (up_rows + lora("up", x_rows))
        h = parts.drop1(h)
        return parts.drop2(parts.down(h) + lora("down", h))

    def forward_routed(self, x: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The base first projections once for the tokens ``x [T, D]``; then, in the sorted layout, a loop over
        the experts (each gathers its rows of the tokens and of the projections, adds its deltas, runs the
        shared second projection and adds its weighted rows to the output: temporaries of one expert's rows),
        or, in the padded and grouped_mm layouts, the same on the whole expert buffer at once."""
        parts = self.parts
        shared = [parts.gate(x), parts.up(x) if parts.up is not None else None]
        if plan.layout != "sorted":
            rows = [dispatch_tokens(t, plan) if t is not None else None for t in (x, *shared)]
            outputs = self._expert_outputs(parts, *rows, lambda n, t: self._lora(n, t, plan))
            return combine_tokens(outputs, weights, plan)
        # The flat assignment each buffer row holds (dropped assignments point one past the buffer).
        slot = plan.slot.reshape(-1)
        assignment = slot.new_empty(plan.num_rows + 1).index_copy_(0, slot, torch.arange(slot.numel(),
                                                                                            device=slot.device))
        row_weight = weights.reshape(-1)[assignment[:plan.num_rows]].split(plan.counts)
        gathered = [list(_ExpertRows.apply(t, plan.row_token, plan.counts)) if t is not None else None
                    for t in (x, *shared)]
        del shared  # [T, H]: no longer needed once its rows are gathered
        out = x.new_zeros(x.shape[0], self.out_features, dtype=torch.promote_types(x.dtype, weights.dtype))
        for e, (tokens, w) in enumerate(zip(plan.row_token.split(plan.counts), row_weight)):
            rows = [g[e] if g is not None else None for g in gathered]
            for g in gathered:  # each expert's rows live only while it runs
                if g is not None:
                    g[e] = None
            if len(tokens):
                y = self._expert_outputs(parts, *rows, lambda n, t, e=e: self._lora_of_expert(n, t, e))
                out = out.index_add(0, tokens, (y * w[:, None]).to(out.dtype))
        return out.to(x.dtype)

    def forward(self, rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """The expert buffer ``rows [R, D]`` through each row's expert (base projections on the rows)."""
        parts = self.parts
        shared = [parts.gate(rows), parts.up(rows) if parts.up is not None else None]
        return self._expert_outputs(parts, rows, *shared, lambda n, t: self._lora(n, t, plan))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, r={self.r}, alpha={self.alpha:g}"


class MixLoRA(MoELayer):
    """A pretrained FFN turned into ``num_experts`` LoRA experts with a top-``k`` router (MixLoRA).

    Args:
        ffn: the pretrained FFN (timm ``Mlp`` or ``SwiGLU``, a LLaMA-style ``gate_proj``/``up_proj``/``down_proj``
            MLP); frozen and kept inside as ``experts.ffn``.
        num_experts: ``E``. Defaults to 8 (the paper).
        k: experts per token. Defaults to 2.
        r, alpha, dropout: LoRA rank, scaling numerator and input dropout. Defaults 8, 16, 0.05.
        router_init_std: std of the router's gate initialisation. Defaults to 0.02.
        aux_loss_coef: Switch/Mixtral load-balance loss coefficient. Defaults to 0.01.
        z_loss_coef: router z-loss coefficient. Defaults to 0 (not in MixLoRA).
        router_jitter: input jitter of the router while training (the reference's ``jitter_noise``, applied
            here to the router input only). Defaults to 0.

    Shapes: ``[..., D] -> [..., D']``. The auxiliary loss is stored as ``aux_loss`` after each forward and
    collected by :func:`moemix.losses.collect_aux_loss`.

    Example:
        >>> import timm
        >>> mlp = timm.layers.Mlp(32, 64)
        >>> layer = MixLoRA(mlp, num_experts=4, k=2)
        >>> x = torch.randn(2, 5, 32)
        >>> torch.allclose(layer.eval()(x), mlp(x), atol=1e-6)   # B = 0: the base FFN until trained
        True
    """

    def __init__(self, ffn: nn.Module, num_experts: int = 8, k: int = 2, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.05, router_init_std: float = 0.02, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.0, router_jitter: float = 0.0):
        check_nonnegative("router_jitter", router_jitter)
        experts = MixLoRAExperts(ffn, num_experts, r, alpha, dropout)
        weight = experts.parts.gate.weight
        router = TopKRouter(experts.in_features, num_experts, k, init_std=router_init_std,
                            noise="jitter" if router_jitter > 0 else None,
                            noise_eps=router_jitter if router_jitter > 0 else None,
                            device=weight.device, dtype=weight.dtype)
        super().__init__(router, experts, aux_loss="switch", aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef)
        self.train(ffn.training)
