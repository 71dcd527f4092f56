"""Mixture-of-experts policies for reinforcement learning on torchrl: the PMOE mixture of tanh-Gaussians
(:class:`TanhNormalMixture`), the policy head that parameterises it (:class:`GMMPolicyHead`) and PMOE's SAC
estimator (:class:`PMOESACLoss`); MENTOR's task-oriented perturbation (:class:`TaskOrientedPerturbation`) and
DrM's :func:`dormant_ratio`."""
from moemix.rl.mixture import GMMPolicyHead, TanhNormalMixture, routing_target, scoring_sampled_primitive
from moemix.rl.perturbation import TaskOrientedPerturbation, dormant_ratio, perturbation_factor

__all__ = ["TanhNormalMixture", "GMMPolicyHead", "routing_target", "scoring_sampled_primitive", "PMOESACLoss",
           "TaskOrientedPerturbation", "dormant_ratio", "perturbation_factor"]


def __getattr__(name: str):  # the loss needs torchrl's objectives, imported on first use
    if name == "PMOESACLoss":
        from moemix.rl.pmoe import PMOESACLoss
        return PMOESACLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
