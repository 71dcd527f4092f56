"""A mixture of tanh-Gaussians: the policy distribution of probabilistic mixture-of-experts policies (PMOE;
Ren et al. 2021, "Probabilistic Mixture-of-Experts for Efficient Deep Reinforcement Learning"; reference code
quantumiracle/Popular-RL-Algorithms ``pmoe.py``).

``K`` components, each torchrl's :class:`~torchrl.modules.TanhNormal` (a diagonal Normal squashed by ``tanh``
and scaled into ``[low, high]``), weighted by ``softmax(logits)``::

    p(a | s) = sum_k w_k(s) TanhNormal(a; mu_k(s), sigma_k(s))

It is a :class:`torch.distributions.Distribution` that plugs into torchrl's ``ProbabilisticActor``, ``SACLoss`` and
``ClipPPOLoss``; with ``K = 1`` it is torchrl's ``TanhNormal``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from moemix._checks import check_positive_int

__all__ = ["TanhNormalMixture", "GMMPolicyHead", "routing_target", "scoring_sampled_primitive"]

_SCORE_PRIMITIVE = contextvars.ContextVar("moemix_score_sampled_primitive", default=False)


@contextlib.contextmanager
def scoring_sampled_primitive() -> Iterator[None]:
    """Within this block, :meth:`TanhNormalMixture.rsample_and_log_prob` (what torchrl's losses call) scores an
    action by the primitive it was drawn from instead of by the mixture: PMOE's critic target."""
    token = _SCORE_PRIMITIVE.set(True)
    try:
        yield
    finally:
        _SCORE_PRIMITIVE.reset(token)


class TanhNormalMixture(D.Distribution):
    """``K`` tanh-Gaussian components with mixing ``logits``.

    Args:
        loc: ``[..., K, A]`` means of the Normals before ``tanh``.
        scale: ``[..., K, A]`` their standard deviations (> 0).
        logits: ``[..., K]`` unnormalised mixing weights.
        low, high: the action bounds (``tanh`` is rescaled into them). Default to -1 and 1.

    Sampling (:meth:`rsample`) draws a component from ``Categorical(logits)`` and a reparameterised action from
    it: gradients reach the chosen component's ``loc`` and ``scale``, not the choice. :meth:`log_prob` is the exact
    mixture density, the tanh correction included. :meth:`entropy` is a Monte-Carlo estimate.
    ``deterministic_sample`` (and ``mode``) is the most probable component's squashed mean.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor, low=-1.0, high=1.0,
                 validate_args: Optional[bool] = None):
        from torchrl.modules import TanhNormal

        if loc.dim() < 2 or loc.shape != scale.shape or logits.shape != loc.shape[:-1]:
            raise ValueError(f"loc and scale must be [..., K, A] and logits [..., K]; got loc {tuple(loc.shape)}, "
                             f"scale {tuple(scale.shape)}, logits {tuple(logits.shape)}")
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.components = TanhNormal(loc, scale, low=low, high=high, event_dims=1)
        self.low, self.high = self.components.low, self.components.high
        super().__init__(batch_shape=loc.shape[:-2], event_shape=loc.shape[-1:], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def probs(self) -> torch.Tensor:
        """``[..., K]`` mixing weights."""
        return self.logits.exp()

    @property
    def support(self):
        return D.constraints.interval(self.low, self.high)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log sum_k w_k p_k(value)`` for actions ``value [*sample, ..., A]`` -> ``[*sample, ...]``."""
        per_component = self.components.log_prob(value.unsqueeze(-2))  # [*sample, ..., K]
        return torch.logsumexp(self.logits + per_component, dim=-1)

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``[*sample, ..., K]``: ``log p_k(value_k)`` of component ``k`` at its own action ``value [..., K, A]``."""
        return self.components.log_prob(value)

    def _rsample_with_primitive_log_prob(self, sample_shape) -> Tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action of a component drawn from ``Categorical(logits)`` and that component's exact
        log-probability of it (scored on the pre-tanh draw)."""
        sample_shape = torch.Size(sample_shape)
        actions, own_log_prob = self.components.rsample_and_log_prob(sample_shape)  # [*, ..., K, A], [*, ..., K]
        with torch.no_grad():
            choice = D.Categorical(logits=self.logits).sample(sample_shape)  # [*sample, ...]
        index = choice[..., None, None].expand(*choice.shape, 1, actions.shape[-1])
        return actions.gather(-2, index).squeeze(-2), own_log_prob.gather(-1, choice[..., None]).squeeze(-1)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self._rsample_with_primitive_log_prob(sample_shape)[0]

    def rsample_and_log_prob(self, sample_shape: torch.Size = torch.Size()) -> Tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action and its mixture log-probability, or, inside :func:`scoring_sampled_primitive`,
        the log-probability of the primitive it was drawn from (PMOE's critic target)."""
        action, primitive_log_prob = self._rsample_with_primitive_log_prob(sample_shape)
        return action, primitive_log_prob if _SCORE_PRIMITIVE.get() else self.log_prob(action)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def entropy(self, num_samples: int = 16) -> torch.Tensor:
        """Monte-Carlo estimate ``-mean log p(a)`` over ``num_samples`` reparameterised actions."""
        check_positive_int("num_samples", num_samples)
        return -self.log_prob(self.rsample((num_samples,))).mean(0)

    @property
    def deterministic_sample(self) -> torch.Tensor:
        means = self.components.deterministic_sample  # [..., K, A]
        best = self.logits.argmax(-1)
        return means.gather(-2, best[..., None, None].expand(*best.shape, 1, means.shape[-1])).squeeze(-2)

    @property
    def mode(self) -> torch.Tensor:
        return self.deterministic_sample


class GMMPolicyHead(nn.Module):
    """Features ``[..., F]`` -> the parameters of a :class:`TanhNormalMixture` over ``A``-dimensional actions:
    ``loc [..., K, A]``, ``scale [..., K, A]`` (``exp`` of the log-std clamped to ``[-20, 2]``, as SAC) and
    routing ``logits [..., K]``, the routing computed on detached features (PMOE: the routing is trained by its
    own loss, not through the policy gradient into the trunk).

    Args:
        in_features: ``F``.
        action_dim: ``A``.
        num_components: ``K``. Defaults to 4.
    """

    def __init__(self, in_features: int, action_dim: int, num_components: int = 4):
        super().__init__()
        for name, value in (("in_features", in_features), ("action_dim", action_dim),
                            ("num_components", num_components)):
            check_positive_int(name, value)
        self.action_dim, self.num_components = action_dim, num_components
        self.primitives = nn.Linear(in_features, 2 * num_components * action_dim)
        self.routing = nn.Linear(in_features, num_components)

    def forward(self, features: torch.Tensor):
        """``(loc, scale, logits)``."""
        params = self.primitives(features).unflatten(-1, (self.num_components, 2 * self.action_dim))
        loc, log_std = params.chunk(2, dim=-1)
        return loc, log_std.clamp(-20.0, 2.0).exp(), self.routing(features.detach())


def routing_target(q_values: torch.Tensor) -> torch.Tensor:
    """One-hot of the best primitive by ``q_values [..., K]`` (PMOE's "frequency" routing target)."""
    return F.one_hot(q_values.argmax(-1), q_values.shape[-1]).to(q_values.dtype)
