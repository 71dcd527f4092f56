"""Mixture-of-experts policies for reinforcement learning on torchrl: the PMOE mixture of tanh-Gaussians
(:class:`TanhNormalMixture`) and the policy head that parameterises it (:class:`GMMPolicyHead`)."""
from moemix.rl.mixture import GMMPolicyHead, TanhNormalMixture, routing_target

__all__ = ["TanhNormalMixture", "GMMPolicyHead", "routing_target"]
