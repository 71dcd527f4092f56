"""Return-weighted trajectory sampling for offline RL (Hong et al., "Harnessing Mixed Offline Reinforcement
Learning Datasets via Trajectory Weighting", ICLR 2023; harness-offline-rl, IQL variant).

Each trajectory ``tau`` gets a score: its return ``G`` (``variant="return"``) or its advantage
``G - V_hat(s0)`` over a linear regression of returns on initial states (``variant="advantage"``). Scores are
min-max normalised to ``G_hat`` in [0, 1] and each transition ``n`` of trajectory ``tau(n)`` is drawn with
probability ``softmax_n(G_hat[tau(n)] / alpha)`` over all transitions (alpha = 0.1 in the paper).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..functional._checks import as_positive_int, check_choice

__all__ = ["ReturnWeightedSampler", "trajectory_scores"]


def trajectory_scores(returns: torch.Tensor, *, variant: str = "return",
                      initial_states: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalised trajectory scores ``G_hat`` ``[E]`` in [0, 1].

    Args:
        returns: ``[E]`` undiscounted return of each trajectory.
        variant: ``"return"`` or ``"advantage"`` (``G - V_hat(s0)``, least squares on ``[s0, 1]``).
        initial_states: ``[E, S]`` first observation of each trajectory; required for ``"advantage"``.

    For ``"advantage"``, spreads below ``1e-9 * max|G|`` count as none (every score 0, uniform sampling): with
    ``E <= S + 1`` trajectories the least-squares fit is exact and the advantages are rounding noise.
    """
    check_choice("variant", variant, ("return", "advantage"))
    g = torch.as_tensor(returns).double().reshape(-1)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("returns must be finite (no NaN or inf)")
    spread_floor = 0.0
    if variant == "advantage":
        if initial_states is None:
            raise ValueError("initial_states [E, S] is required for variant='advantage'")
        s0 = initial_states.double().reshape(g.numel(), -1)
        design = torch.cat([s0, torch.ones(g.numel(), 1, dtype=g.dtype)], dim=1)
        coef = torch.linalg.lstsq(design, g.unsqueeze(1)).solution
        spread_floor = 1e-9 * float(g.abs().max())  # an exact fit leaves rounding noise of about this size
        g = g - (design @ coef).squeeze(1)
    lo, hi = g.min(), g.max()
    return torch.zeros_like(g) if hi - lo <= spread_floor else (g - lo) / (hi - lo)


class ReturnWeightedSampler(Sampler[int]):
    """A ``torch.utils.data.Sampler`` over transitions, weighted by their trajectory's normalised return.

    Args:
        returns: ``[E]`` return per trajectory.
        episode_index: ``[N]`` trajectory id (0..E-1) of each transition in the dataset.
        alpha: softmax temperature, > 0. Defaults to 0.1.
        variant: ``"return"`` or ``"advantage"``. Defaults to ``"return"``.
        initial_states: ``[E, S]``, for ``"advantage"``.
        num_samples: indices per epoch. Defaults to N.
        replacement: draw with replacement. Defaults to True.
        generator: optional ``torch.Generator``.

    Attributes:
        probabilities: ``[N]`` the sampling distribution over transitions.

    Example:
        >>> s = ReturnWeightedSampler(torch.tensor([0.0, 10.0]), torch.tensor([0, 0, 1]), alpha=1.0)
        >>> [round(p, 3) for p in s.probabilities.tolist()]
        [0.212, 0.212, 0.576]
    """

    def __init__(self, returns: torch.Tensor, episode_index: torch.Tensor, *, alpha: float = 0.1,
                 variant: str = "return", initial_states: torch.Tensor | None = None,
                 num_samples: int | None = None, replacement: bool = True,
                 generator: torch.Generator | None = None) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        episode_index = torch.as_tensor(episode_index).long().reshape(-1)
        returns = torch.as_tensor(returns)
        if episode_index.numel() == 0 or int(episode_index.min()) < 0 or int(episode_index.max()) >= returns.numel():
            raise ValueError(f"episode_index must hold trajectory ids in [0, {returns.numel()}), one per transition")
        self.scores = trajectory_scores(returns, variant=variant, initial_states=initial_states)
        self.probabilities = torch.softmax(self.scores[episode_index] / alpha, dim=0).float()
        if num_samples is not None:
            num_samples = as_positive_int("num_samples", num_samples)
        self.num_samples = num_samples if num_samples is not None else episode_index.numel()
        if not replacement and self.num_samples > episode_index.numel():
            raise ValueError(f"num_samples={self.num_samples} exceeds the {episode_index.numel()} transitions, which "
                             "replacement=False cannot draw more than once")
        self.replacement = replacement
        self.generator = generator

    @classmethod
    def from_rewards(cls, rewards: torch.Tensor, dones: torch.Tensor, **kwargs) -> "ReturnWeightedSampler":
        """Build from flat ``[N]`` rewards and episode-end flags (the last transition of each trajectory)."""
        dones = torch.as_tensor(dones).bool().reshape(-1).clone()
        dones[-1] = True
        episode_index = torch.cat([torch.zeros(1, dtype=torch.long), dones[:-1].long().cumsum(0)])
        returns = torch.zeros(int(episode_index[-1]) + 1, dtype=torch.float64)
        returns.index_add_(0, episode_index, torch.as_tensor(rewards).double().reshape(-1))
        return cls(returns, episode_index, **kwargs)

    def sample(self, batch_size: int) -> torch.Tensor:
        """``[batch_size]`` transition indices."""
        return torch.multinomial(self.probabilities, batch_size, self.replacement, generator=self.generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.sample(self.num_samples).tolist()

    def __len__(self) -> int:
        return self.num_samples

    def as_torchrl_sampler(self):
        """The same distribution as a torchrl replay-buffer ``Sampler`` (needs torchrl; imported lazily).

        Use with a buffer whose storage holds the transitions in dataset order:
        ``ReplayBuffer(storage=..., sampler=s.as_torchrl_sampler(), batch_size=256)``.
        """
        from torchrl.data.replay_buffers.samplers import Sampler as _TorchRLSampler

        outer = self

        class _ReturnWeighted(_TorchRLSampler):
            def sample(self, storage, batch_size):
                n = len(storage)
                if n != outer.probabilities.numel():
                    raise ValueError(f"storage holds {n} transitions, the sampler was built for "
                                     f"{outer.probabilities.numel()}")
                return outer.sample(batch_size), {}

            def _empty(self):
                pass

            def dumps(self, path):
                torch.save(outer.probabilities, f"{path}/return_weighted.pt")

            def loads(self, path):
                outer.probabilities = torch.load(f"{path}/return_weighted.pt")

            def state_dict(self):
                return {"probabilities": outer.probabilities}

            def load_state_dict(self, state_dict):
                outer.probabilities = state_dict["probabilities"]

        return _ReturnWeighted()
