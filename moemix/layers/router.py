"""Top-k token routers.

A router maps tokens ``[T, D]`` to a :class:`RoutingDecision`: which ``k`` experts each token goes to
and with what weight. It is the gate the moemix MoE layers (``SparseMoE``, ``MoELayer``, expert parallelism)
use; method-specific scoring plugs in through ``score`` or an override of ``TopKRouter.gate_logits``.

References:
    Shazeer et al. 2017, "Outrageously Large Neural Networks" (noisy top-k gating).
    Fedus et al. 2021, "Switch Transformers" (input jitter, capacity factor).
    Zoph et al. 2022, "ST-MoE" (router in fp32, z-loss).
    Lepikhin et al. 2021, "GShard" (sampled second expert); DeepSpeed-MoE "RSample" (Gumbel noise on the choice).
    Chi et al. 2022, "X-MoE" (cosine router with a learnable temperature); Cong et al. 2023, "GNT-MOVE"
    (cosine router with a learnable temperature per expert).
    Jiang et al. 2024, "Mixtral of Experts" (softmax, top-k, renormalise).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moemix.layers._validate import (check_bool, check_choice, check_last_dim, check_nonnegative, check_optional_bool,
                                     check_positive, check_positive_int)

__all__ = ["RoutingDecision", "TopKRouter", "SCORE_FUNCTIONS", "NOISE_TYPES", "expert_capacity"]

SCORE_FUNCTIONS = ("softmax", "sigmoid", "cosine")
NOISE_TYPES = (None, "jitter", "gumbel", "normal")
MIN_TEMPERATURE = 0.01  # the cosine score's temperature is clamped here (X-MoE)


@dataclass
class RoutingDecision:
    """What a router decided for ``T`` tokens, ``E`` experts, top-``k``.

    Attributes:
        logits: ``[T, E]`` float32 gate logits (after jitter or normal noise, before the score function; Gumbel
            noise only perturbs the choice, not these); float64 for float64 tokens.
        probs: ``[T, E]`` scores over all experts (softmax / sigmoid of ``logits``), in ``logits``' dtype.
        weights: ``[T, k]`` combine weights of the chosen experts, taken from ``probs`` (zero where dropped).
        indices: ``[T, k]`` int64 expert ids, sorted by descending score per token (while training with
            ``noise="gumbel"``: the sampled expert for ``k = 1``; else the top choice, then the sampled ones by
            their perturbed score).
        kept: ``[T, k]`` bool, False for assignments dropped by the capacity limit, else None.
        capacity: tokens each expert may take, or None in dropless mode.
        num_dropped: number of dropped assignments (0 in dropless mode); reading it waits for the
            device (the layers take the count from the dispatch plan instead).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    kept: Optional[torch.Tensor] = field(default=None, kw_only=True)
    capacity: Optional[int] = field(default=None, kw_only=True)

    @property
    def num_dropped(self) -> int:
        return 0 if self.kept is None else int((~self.kept).sum())

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tokens per expert under a capacity factor, as tutel/GShard: ``k * int(cf * ceil(T / E))``."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
    check_positive_int("num_experts", num_experts)
    check_positive_int("k", k)
    check_positive("capacity_factor", capacity_factor)
    return k * int(capacity_factor * math.ceil(num_tokens / num_experts))


class TopKRouter(nn.Module):
    """Linear top-k gate computed in float32 (in float64 for float64 tokens, e.g. for ``gradcheck``).

    ``logits = x @ W^T`` (no bias), optional noise, a score function over experts, top-k selection,
    optional renormalisation of the k weights, and optionally a capacity limit that drops the
    overflow assignments (GShard priority: all first choices before any second choice).

    Args:
        in_features: token width ``D``.
        num_experts: number of experts ``E``.
        k: experts per token. Defaults to 2.
        score: ``"softmax"`` (Mixtral/Switch), ``"sigmoid"`` (independent scores), or ``"cosine"``
            (cosine similarity between L2-normalised projected tokens and expert embeddings divided by a
            learnable temperature, as X-MoE/tutel/GNT-MOVE; softmax on top). Defaults to ``"softmax"``.
        noise: training-time noise: ``None``; ``"jitter"`` multiplies the input by U(1-eps, 1+eps)
            (Switch/megablocks); ``"gumbel"`` samples the choice with the Gumbel-max trick on the logits (the
            softmax's distribution, whatever ``score``): with ``k = 1`` the expert (DeepSpeed "RSample",
            Mesh-TensorFlow's sampled Switch policy), with ``k > 1`` the experts after the clean top one (GShard's
            sampled second expert, DeepSpeed's and fairseq's top-2 gates); the weights, ``probs`` and ``logits``
            stay the clean ones; ``"normal"`` adds N(0, (eps / E)^2) to the logits, weights included (tutel,
            GNT-MOVE). Defaults to None.
        noise_eps: jitter width or normal-noise scale (only with those two). Defaults to 1e-2 for jitter,
            1.0 for normal.
        renormalize: divide the k weights by their sum (Mixtral). Defaults to True for ``k > 1`` and
            False for ``k = 1`` (Switch: the weight is the gate probability, through which the router learns
            from the task loss; renormalised it would always be 1, which warns).
        capacity_factor: if set, each expert takes at most ``expert_capacity(T, E, k, cf)`` assignments
            and the rest are dropped (weight zero, ``kept`` False). Defaults to None (dropless).
        cosine_dim: projection width for the cosine score. Defaults to ``D``.
        temperature: initial temperature of the cosine score (the learnable parameter is the log of its
            inverse, clamped so the temperature stays >= 0.01, as X-MoE). Defaults to 0.07 (X-MoE); GNT-MOVE
            starts at 1.0.
        per_expert_temperature: one learnable temperature per expert (GNT-MOVE) instead of one shared
            (X-MoE, tutel). Defaults to False.
        init_std: if set, the gate weights (the expert embeddings for ``"cosine"``) are drawn from
            N(0, init_std^2) (MixLoRA uses 0.02); otherwise ``nn.Linear``'s default init.

    Shapes:
        input ``[T, D]`` (or ``[..., D]``, flattened), output :class:`RoutingDecision` with ``T`` rows.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        *,
        score: str = "softmax",
        noise: Optional[str] = None,
        noise_eps: Optional[float] = None,
        renormalize: Optional[bool] = None,
        capacity_factor: Optional[float] = None,
        cosine_dim: Optional[int] = None,
        temperature: Optional[float] = None,
        per_expert_temperature: bool = False,
        init_std: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        noise_eps, renormalize = _checked_options(in_features, num_experts, k, score, noise, noise_eps, renormalize,
                                                  capacity_factor, init_std)
        self.in_features = in_features
        self.num_experts = num_experts
        self.k = k
        self.score = score
        self.noise = noise
        self.noise_eps = float(noise_eps)
        self.renormalize = renormalize
        self.capacity_factor = capacity_factor
        per_expert_temperature = check_bool("per_expert_temperature", per_expert_temperature)
        dd = {"device": device, "dtype": dtype}
        for name, value in (("cosine_dim", cosine_dim), ("temperature", temperature),
                            ("per_expert_temperature", per_expert_temperature or None)):
            if value is not None and score != "cosine":
                raise ValueError(f"{name} applies to score='cosine', got score={score!r}")
        if score == "cosine":
            cosine_dim = in_features if cosine_dim is None else cosine_dim
            check_positive_int("cosine_dim", cosine_dim)
            self.temperature = 0.07 if temperature is None else temperature
            check_positive("temperature", self.temperature)
            if self.temperature < MIN_TEMPERATURE:
                raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (its clamp), got {self.temperature!r}")
            self.proj = nn.Linear(in_features, cosine_dim, bias=False, **dd)
            self.weight = nn.Parameter(torch.empty(num_experts, cosine_dim, **dd))
            # The log of the inverse temperature is learned (X-MoE), one per expert for GNT-MOVE.
            self.log_inv_temperature = nn.Parameter(torch.empty(num_experts if per_expert_temperature else 1, **dd))
        else:
            self.proj, self.temperature = None, None
            self.weight = nn.Parameter(torch.empty(num_experts, in_features, **dd))
            self.register_parameter("log_inv_temperature", None)
        self.init_std = init_std
        self._reset_gate()  # the projection was just initialised by nn.Linear

    def reset_parameters(self) -> None:
        """Re-initialise the gate: its weights, and for ``"cosine"`` the projection and the temperature."""
        if self.proj is not None:
            self.proj.reset_parameters()
        self._reset_gate()

    def _reset_gate(self) -> None:
        if self.init_std is not None:
            nn.init.normal_(self.weight, std=self.init_std)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        if self.log_inv_temperature is not None:
            with torch.no_grad():
                self.log_inv_temperature.fill_(-math.log(self.temperature))

    def extra_repr(self) -> str:
        cf = f", capacity_factor={self.capacity_factor}" if self.capacity_factor else ""
        temperature = "" if self.proj is None else \
            f", initial temperature={self.temperature} ({self.log_inv_temperature.numel()} learnable)"
        return (f"{self.in_features}, num_experts={self.num_experts}, k={self.k}, score={self.score!r}{temperature}, "
                f"noise={self.noise!r}, renormalize={self.renormalize}{cf}")

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate without noise: ``x [T, D]`` in float32 (float64 for float64 tokens) -> ``[T, E]`` logits in
        ``x``'s dtype. Override it to score experts
        another way; noise, the score function, top-k and capacity stay this class's. (The gate's
        ``weight`` is then unused unless the override uses it: freeze it, ``weight.requires_grad_(False)``,
        so that e.g. DDP does not wait for its gradient.)"""
        dtype = x.dtype
        if self.score == "cosine":
            h = F.normalize(F.linear(x, self.proj.weight.to(dtype)), dim=-1)
            w = F.normalize(self.weight.to(dtype), dim=-1)
            scale = self.log_inv_temperature.to(dtype).clamp(max=-math.log(MIN_TEMPERATURE)).exp()
            return F.linear(h, w) * scale
        return F.linear(x, self.weight.to(dtype))

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, D]`` -> ``[T, E]`` logits (:meth:`gate_logits`) in float32, or float64 for float64 tokens, jitter
        or normal noise included when training (Gumbel noise applies to the choice only, in :meth:`forward`)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.training and self.noise == "jitter" and self.noise_eps > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.noise_eps, 1 + self.noise_eps)
        logits = self.gate_logits(x)
        if self.training and self.noise == "normal" and self.noise_eps > 0:
            logits = logits + torch.randn_like(logits) * (self.noise_eps / self.num_experts)
        return logits

    def forward(self, x: torch.Tensor) -> RoutingDecision:
        check_last_dim("TopKRouter", x, self.in_features)
        x = x.reshape(-1, self.in_features)
        device_type = x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            logits = self.compute_logits(x)
            probs = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, dim=-1)
            if self.training and self.noise == "gumbel":  # sample the choice; the weights stay the clean scores
                indices = _gumbel_choice(logits, self.k)
                weights = probs.gather(-1, indices)
            else:
                weights, indices = torch.topk(probs, self.k, dim=-1)
            if self.renormalize:
                total = weights.sum(dim=-1, keepdim=True)
                if self.score == "sigmoid":  # sigmoid scores can all underflow to 0; a softmax top-1 is >= 1/E
                    total = total.clamp(min=torch.finfo(weights.dtype).tiny)
                weights = weights / total
        decision = RoutingDecision(logits=logits, probs=probs, weights=weights, indices=indices)
        if self.capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], self.num_experts, self.k, self.capacity_factor)
            if capacity == 0 and x.shape[0]:
                warnings.warn(f"capacity_factor={self.capacity_factor} gives every expert a capacity of 0 for "
                              f"{x.shape[0]} tokens and {self.num_experts} experts (k * int(cf * ceil(T / E))): "
                              "all assignments are dropped")
            apply_capacity(decision, capacity)
        return decision


def _checked_options(in_features, num_experts, k, score, noise, noise_eps, renormalize, capacity_factor, init_std):
    """``ValueError`` for router options out of range; returns ``noise_eps`` and ``renormalize`` with their
    defaults filled in."""
    check_positive_int("in_features", in_features)
    check_positive_int("num_experts", num_experts)
    check_positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts ({num_experts}), got k={k}")
    check_choice("score", score, SCORE_FUNCTIONS)
    check_choice("noise", noise, NOISE_TYPES)
    renormalize = check_optional_bool("renormalize", renormalize)
    if noise_eps is not None and noise not in ("jitter", "normal"):
        raise ValueError(f"noise_eps applies to noise='jitter' or 'normal', got noise={noise!r}")
    if noise_eps is None:
        noise_eps = 1e-2 if noise == "jitter" else 1.0
    check_nonnegative("noise_eps", noise_eps)
    if noise == "jitter" and noise_eps >= 1:
        raise ValueError(f"noise_eps for jitter must be in [0, 1), got {noise_eps}")
    if capacity_factor is not None:
        check_positive("capacity_factor", capacity_factor)
    if init_std is not None:
        check_nonnegative("init_std", init_std)
    if renormalize is None:
        renormalize = k > 1
    elif renormalize and k == 1:
        warnings.warn("renormalize=True with k=1 makes every combine weight 1, so the router learns from the "
                      "auxiliary losses only; leave renormalize unset for Switch-style gating (weight = "
                      "gate probability)", stacklevel=3)
    return noise_eps, renormalize


def _gumbel_choice(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, k]`` experts drawn with the Gumbel-max trick: for ``k = 1`` the argmax of logits + Gumbel(0, 1), a
    draw from the softmax (DeepSpeed "RSample"); for ``k > 1`` the clean top choice first, then the other
    ``k - 1`` drawn without replacement from the softmax over the rest (GShard's sampled second expert, as
    DeepSpeed's and fairseq's top-2 gates)."""
    u = torch.rand_like(logits).clamp_(min=1e-20)  # [0, 1) -> -log(u) > 0
    noisy = logits - torch.log((-torch.log(u)).clamp(min=1e-20))  # + Gumbel(0, 1)
    if k == 1:
        return noisy.argmax(dim=-1, keepdim=True)
    first = logits.argmax(dim=-1, keepdim=True)
    rest = noisy.scatter(-1, first, float("-inf")).topk(k - 1, dim=-1).indices
    return torch.cat([first, rest], dim=-1)


def apply_capacity(decision: RoutingDecision, capacity: int) -> RoutingDecision:
    """Drop assignments beyond ``capacity`` per expert, first choices first (GShard priority).

    Sets ``decision.kept`` and ``decision.capacity`` and zeroes the dropped weights. In place, without
    waiting for the device.
    """
    indices = decision.indices
    num_tokens, k = indices.shape
    # Priority order: choice rank major, token minor (every token's 1st choice before any 2nd choice).
    flat = indices.t().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=decision.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    position = torch.empty_like(position_sorted)
    position[order] = position_sorted
    kept = (position < capacity).view(k, num_tokens).t()
    decision.kept = kept
    decision.weights = decision.weights * kept
    decision.capacity = capacity
    return decision
