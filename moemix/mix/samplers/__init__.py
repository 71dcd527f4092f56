"""Data samplers that decide what gets mixed into a batch: trajectory weighting and Skill-It mixtures."""
from .return_weighted import ReturnWeightedSampler, trajectory_scores
from .skill_it import SkillItSampler

__all__ = ["ReturnWeightedSampler", "trajectory_scores", "SkillItSampler"]
