"""MENTOR's task-oriented perturbation (Huang et al. 2024, "MENTOR: Mixture-of-Experts Network with
Task-Oriented Perturbation for Visual Reinforcement Learning"; reference code suninghuang19/mentor) and the
dormant-neuron ratio it is driven by (Xu et al. 2024, DrM; reference code XuGW-Kevin/DrM).

The dormant ratio of a network on a batch: every ``nn.Linear`` output ``h`` is hooked; neuron ``i`` of a layer
scores ``s_i = mean_batch |h_i|`` and is dormant when ``s_i < tau * mean_layer(s)`` (``tau = 0.025``); the ratio
counts dormant neurons over all neurons of all layers.

The perturbation keeps the weights of the ``top_k`` (10) best episodes seen so far (the worst is replaced when a
better episode arrives) and, when asked, moves every ``nn.Linear`` / ``nn.Conv*`` weight toward a draw from them::

    theta <- a * theta + (1 - a) * phi,   phi ~ N(mean, std) elementwise over the snapshots,
    a = clip(1 - 2 * dormant_ratio, 0.2, max_perturb)

then resets the optimiser's state.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from moemix._checks import check_positive_int, check_probability

__all__ = ["dormant_ratio", "TaskOrientedPerturbation", "perturbation_factor"]

_PERTURBED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def dormant_ratio(module: nn.Module, *inputs, tau: float = 0.025) -> float:
    """The share of dormant ``nn.Linear`` neurons of ``module`` on the batch ``inputs`` (run once, no grad)."""
    check_probability("tau", tau)
    outputs: List[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
               for m in module.modules() if isinstance(m, nn.Linear)]
    try:
        module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not outputs:
        raise ValueError(f"module {type(module).__name__} has no nn.Linear layer that ran on the inputs")
    dormant = total = 0
    for out in outputs:
        score = out.abs().reshape(-1, out.shape[-1]).mean(0)
        dormant += int((score < tau * score.mean()).sum())
        total += score.numel()
    return dormant / total


def perturbation_factor(ratio: float, max_perturb: float = 0.95, min_perturb: float = 0.2) -> float:
    """``a = clip(1 - 2 * ratio, min_perturb, max_perturb)``: the share of the current weights that is kept."""
    return float(min(max(1.0 - 2.0 * ratio, min_perturb), max_perturb))


class TaskOrientedPerturbation:
    """Snapshots of the best episodes' weights and the perturbation toward them.

    Args:
        top_k: snapshots kept (those with the highest episode returns). Defaults to 10.
        max_perturb: the largest share of the current weights kept. Defaults to 0.95.
        min_perturb: the smallest share kept. Defaults to 0.2.
    """

    def __init__(self, top_k: int = 10, max_perturb: float = 0.95, min_perturb: float = 0.2):
        check_positive_int("top_k", top_k)
        check_probability("max_perturb", max_perturb)
        check_probability("min_perturb", min_perturb)
        if min_perturb > max_perturb:
            raise ValueError(f"min_perturb={min_perturb} must be at most max_perturb={max_perturb}")
        self.top_k, self.max_perturb, self.min_perturb = top_k, max_perturb, min_perturb
        self.snapshots: List[Tuple[float, Dict[str, torch.Tensor]]] = []

    @staticmethod
    def _weights(module: nn.Module) -> Dict[str, nn.Parameter]:
        return {f"{name}.weight": m.weight for name, m in module.named_modules() if isinstance(m, _PERTURBED)}

    def offer(self, module: nn.Module, episode_return: float) -> bool:
        """Keep a copy of ``module``'s weights if ``episode_return`` is among the ``top_k`` best; returns whether
        it was kept."""
        if len(self.snapshots) >= self.top_k:
            worst = min(range(len(self.snapshots)), key=lambda i: self.snapshots[i][0])
            if episode_return <= self.snapshots[worst][0]:
                return False
            self.snapshots.pop(worst)
        weights = {k: w.detach().clone() for k, w in self._weights(module).items()}
        self.snapshots.append((float(episode_return), weights))
        return True

    @torch.no_grad()
    def perturb(self, module: nn.Module, ratio: float, optimizer: Optional[torch.optim.Optimizer] = None,
                generator: Optional[torch.Generator] = None) -> float:
        """Move ``module``'s weights toward a draw from the snapshots with ``a = perturbation_factor(ratio)``
        and clear ``optimizer``'s state; returns ``a``. Without snapshots nothing changes (returns 1)."""
        if not self.snapshots:
            return 1.0
        a = perturbation_factor(ratio, self.max_perturb, self.min_perturb)
        for name, weight in self._weights(module).items():
            stack = torch.stack([snapshot[name] for _, snapshot in self.snapshots])
            mean = stack.mean(0)
            std = stack.std(0, unbiased=False)
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            weight.mul_(a).add_((mean + std * noise) * (1.0 - a))
        if optimizer is not None:
            optimizer.state.clear()
        return a
