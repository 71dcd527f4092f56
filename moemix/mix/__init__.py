"""Mixing augmentations: a functional core, ``(x, y) -> (x_mixed, y_soft)`` transforms and data samplers."""
from . import functional
from .samplers import ReturnWeightedSampler, SkillItSampler
from .mixup_cutmix import MODES, CutMix, MixUp, MixUpCutMix
from .patchmix import PatchMix
from .record import MixRecord
from .transmix import CLSAttentionHook, TransMix, attach_transmix, cls_attention_from_qk, transmix_lambda

__all__ = ["functional", "MixRecord", "MixUpCutMix", "MixUp", "CutMix", "MODES", "PatchMix", "ReturnWeightedSampler", "SkillItSampler",
           "TransMix", "CLSAttentionHook", "attach_transmix", "cls_attention_from_qk", "transmix_lambda"]
