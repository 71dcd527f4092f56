"""PMOE's estimator for SAC (Ren et al. 2021, "Probabilistic Mixture-of-Experts for Efficient Deep Reinforcement
Learning"; reference code quantumiracle/Popular-RL-Algorithms ``pmoe.py``) as a torchrl ``SACLoss``.

For a :class:`~moemix.rl.TanhNormalMixture` actor, every primitive ``k`` proposes a reparameterised action
``a_k``; the best, ``k* = argmax_k min(Q1, Q2)(s, a_k)``, is back-propagated::

    loss_actor = alpha * log pi_k*(a_k* | s) - min(Q1, Q2)(s, a_k*) + routing_coef * MSE(w(s), one_hot(k*))

The critic target draws the next action from a primitive sampled by ``Categorical(w(s'))`` and uses that
primitive's log-probability. The temperature loss uses ``log pi_k*``. Everything else is torchrl's ``SACLoss``.
"""
from __future__ import annotations

import torch
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.objectives import SACLoss

from moemix._checks import check_nonnegative
from moemix.rl.mixture import TanhNormalMixture, routing_target, scoring_sampled_primitive

__all__ = ["PMOESACLoss"]


class PMOESACLoss(SACLoss):
    """torchrl's ``SACLoss`` (version 2, no value network) with PMOE's actor and critic estimators.

    Args:
        actor_network: a ``ProbabilisticActor`` whose distribution is a :class:`~moemix.rl.TanhNormalMixture`.
        qvalue_network: the Q-network (duplicated ``num_qvalue_nets`` times, as ``SACLoss`` does).
        routing_coef: weight of the routing loss ``MSE(w(s), one_hot(k*))``. Defaults to 1.
        **kwargs: ``SACLoss``'s (``num_qvalue_nets``, ``action_spec``, ``alpha_init``, ...).

    The output adds ``routing_loss`` (already inside ``loss_actor``, so not named ``loss_*``) and
    ``best_primitive_share`` (``[K]``, how often each primitive was the best in the batch).
    """

    def __init__(self, actor_network, qvalue_network, *, routing_coef: float = 1.0, **kwargs):
        check_nonnegative("routing_coef", routing_coef)
        if kwargs.get("value_network") is not None:
            raise ValueError("value_network: PMOESACLoss is SAC version 2 (no state-value network)")
        super().__init__(actor_network, qvalue_network, **kwargs)
        self.routing_coef = float(routing_coef)
        self._routing = None

    def actor_loss(self, tensordict):
        weights = self._maybe_get_priority_weight(tensordict)
        with set_exploration_type(ExplorationType.RANDOM), self.actor_network_params.to_module(
                self.actor_network, preserve_module_state=False):
            dist = self.actor_network.get_dist(tensordict)
        if not isinstance(dist, TanhNormalMixture):
            raise TypeError(f"actor_network must produce a TanhNormalMixture, got {type(dist).__name__}")
        actions, log_probs = dist.components.rsample_and_log_prob()  # [B, K, A], [B, K]
        td_q = tensordict.select(*self.qvalue_network.in_keys, strict=False)
        td_q = td_q.unsqueeze(-1).expand(*td_q.batch_size, dist.num_components).clone(False)
        td_q.set(self.tensor_keys.action, actions)
        q = self._vmap_qnetworkN0(td_q, self._cached_detached_qvalue_params)
        q = q.get(self.tensor_keys.state_action_value).min(0)[0].squeeze(-1)  # [B, K]
        best = q.detach().argmax(-1, keepdim=True)
        log_prob = log_probs.gather(-1, best).squeeze(-1)
        target = routing_target(q.detach())
        routing = (dist.probs - target).pow(2).mean(-1)
        loss_actor = self._alpha * log_prob - q.gather(-1, best).squeeze(-1) + self.routing_coef * routing
        self._routing = (routing.detach().mean(), target.mean(tuple(range(target.dim() - 1))))
        return self._reduce_loss(loss_actor, tensordict=tensordict, weights=weights), {"log_prob": log_prob.detach()}

    def _compute_target_v2(self, tensordict) -> torch.Tensor:
        with scoring_sampled_primitive():
            return super()._compute_target_v2(tensordict)

    def forward(self, tensordict):
        out = super().forward(tensordict)
        if self.reduction != "none":
            out.set("routing_loss", self._routing[0])
            out.set("best_primitive_share", self._routing[1])
        return out
