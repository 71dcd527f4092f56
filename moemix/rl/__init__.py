"""Mixture-of-experts policies for reinforcement learning on torchrl: the PMOE mixture of tanh-Gaussians
(:class:`TanhNormalMixture`), the policy head that parameterises it (:class:`GMMPolicyHead`) and PMOE's SAC
estimator (:class:`PMOESACLoss`)."""
from moemix.rl.mixture import GMMPolicyHead, TanhNormalMixture, routing_target, scoring_sampled_primitive

__all__ = ["TanhNormalMixture", "GMMPolicyHead", "routing_target", "scoring_sampled_primitive", "PMOESACLoss"]


def __getattr__(name: str):  # the loss needs torchrl's objectives, imported on first use
    if name == "PMOESACLoss":
        from moemix.rl.pmoe import PMOESACLoss
        return PMOESACLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
