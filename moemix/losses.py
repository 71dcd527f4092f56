"""Auxiliary router losses and :func:`collect_aux_loss`.

All functions take router outputs for ``T`` tokens and ``E`` experts and return a float32 scalar.

References:
    Fedus et al. 2021, "Switch Transformers" (load-balance loss); Jiang et al. 2024, "Mixtral" (top-k form).
    Zoph et al. 2022, "ST-MoE" (router z-loss).
    Shazeer et al. 2017, "Outrageously Large Neural Networks" (importance and load cv^2 losses).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moemix._checks import is_integer

__all__ = ["load_balance_loss", "load_balance_from_counts", "router_z_loss", "importance_load_loss", "router_entropy", "cv_squared",
           "collect_aux_loss"]


def _token_rows(name: str, scores: torch.Tensor) -> torch.Tensor:
    """``[..., E]`` scores as ``[T, E]`` rows; fewer than two dimensions raise."""
    if scores.dim() < 2:
        raise ValueError(f"{name} must be [T, E] (or [..., E]), got shape {tuple(scores.shape)}")
    return scores.reshape(-1, scores.shape[-1])


def _check_routing(probs: torch.Tensor, indices: torch.Tensor) -> None:
    if probs.dim() != 2 or indices.dim() != 2 or probs.shape[0] != indices.shape[0]:
        raise ValueError(f"probs must be [T, E] and indices [T, k] with the same T, got probs "
                         f"{tuple(probs.shape)} and indices {tuple(indices.shape)}")


def _assignment_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, float32 ``[E]``; ids outside ``[0, E)`` raise (the count's length shows
    a too-large id without waiting for the device; ``bincount`` itself refuses negative ones)."""
    try:
        counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    except RuntimeError as err:
        raise ValueError(f"indices must be expert ids in [0, {num_experts}): {err}") from None
    if counts.shape[0] != num_experts:
        raise ValueError(f"indices must be expert ids in [0, {num_experts}) (E = probs.shape[-1]), "
                         f"got id {counts.shape[0] - 1}")
    return counts.to(torch.float32)


def load_balance_loss(probs: torch.Tensor, indices: torch.Tensor, *, top1_only: bool = False) -> torch.Tensor:
    """Switch/Mixtral load-balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the ``T * k`` assignments sent to expert ``e`` (Mixtral/HF count all k
    choices; ``top1_only=True`` counts only the first choice, as Switch), ``P_e`` the mean router
    probability of ``e``. Equals 1 for perfectly uniform routing.

    Args:
        probs: ``[T, E]`` router probabilities.
        indices: ``[T, k]`` chosen experts (first column = top choice).
        top1_only: count only the first choice. Defaults to False.
    """
    _check_routing(probs, indices)
    chosen = indices[:, :1] if top1_only else indices
    if chosen.numel() == 0:
        return probs.new_zeros((), dtype=torch.float32)
    return load_balance_from_counts(probs, _assignment_counts(chosen, probs.shape[-1]), chosen.numel())


def load_balance_from_counts(probs: torch.Tensor, counts: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """:func:`load_balance_loss` from assignment counts already made (a dispatch plan's ``tokens_per_expert``
    when nothing was dropped): ``E * sum_e (counts_e / num_assignments) * mean_t probs[t, e]``.

    Args:
        probs: ``[T, E]`` router probabilities.
        counts: ``[E]`` assignments per expert (any numeric dtype).
        num_assignments: the assignments ``counts`` sums to (``T * k``), > 0 (an integer is checked; a tensor
            or a ``torch.compile`` SymInt is taken as it is).
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [T, E], got shape {tuple(probs.shape)}")
    # Python and NumPy integers are checked; a SymInt (torch.compile, dynamic shapes) or a tensor is taken as it is.
    integer = is_integer(num_assignments)
    if (integer and num_assignments < 1) or not (integer or isinstance(num_assignments, (torch.SymInt, torch.Tensor))):
        raise ValueError(f"num_assignments must be a positive integer (T * k), got {num_assignments!r}")
    num_experts = probs.shape[-1]
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must have shape ({num_experts},) (E = probs.shape[-1]), got {tuple(counts.shape)}")
    mean_prob = probs.float().mean(0)
    return torch.dot(counts.to(torch.float32), mean_prob) * (num_experts / num_assignments)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_e logits[t, e])^2``; ``logits`` is ``[T, E]`` (or ``[..., E]``)."""
    logits = _token_rows("logits", logits)
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(x) / mean(x)^2`` (population variance)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean().square() + eps)


def importance_load_loss(probs: torch.Tensor, indices: torch.Tensor, *,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Shazeer et al. importance + load loss ``cv^2(importance) + cv^2(load)``.

    ``importance_e`` is the sum over tokens of the gate value of ``e`` (the top-k ``weights`` when
    given, else ``probs``); ``load_e`` is the number of assignments to ``e``. The paper's smooth load
    estimator (normal CDF of the noisy-gate margin) is replaced by the hard count, so the gradient flows
    through the importance term only.

    Args:
        probs: ``[T, E]`` router probabilities.
        indices: ``[T, k]`` chosen experts.
        weights: optional ``[T, k]`` gate values of the chosen experts.
    """
    _check_routing(probs, indices)
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights must have the shape of indices {tuple(indices.shape)}, got {tuple(weights.shape)}")
    num_experts = probs.shape[-1]
    load = _assignment_counts(indices, num_experts)
    if weights is not None:
        importance = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
        importance = importance.index_add(0, indices.reshape(-1), weights.reshape(-1).float())
    else:
        importance = probs.float().sum(0)
    return cv_squared(importance) + cv_squared(load)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy ``-sum_e p log p`` of ``[T, E]`` (or ``[..., E]``) router probabilities (nats)."""
    probs = _token_rows("probs", probs)
    if probs.shape[0] == 0:
        return probs.new_zeros((), dtype=torch.float32)
    p = probs.float()
    return -(p * torch.log(p.clamp(min=1e-20))).sum(-1).mean()


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``module.aux_loss`` over every submodule that stored one in its last forward.

    Returns a float32 scalar (zero when no layer stored a loss) on the model's device. Each stored tensor
    counts once, also where a wrapper hands out its inner module's attributes (``torch.compile``'s
    ``OptimizedModule`` answers ``aux_loss`` with the compiled layer's).
    """
    total = None
    seen = set()
    for module in model.modules():
        loss = getattr(module, "aux_loss", None)
        if isinstance(loss, torch.Tensor) and id(loss) not in seen:
            seen.add(id(loss))
            total = loss.float() if total is None else total + loss.float()
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total
