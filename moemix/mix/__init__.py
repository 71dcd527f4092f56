"""Mixing augmentations: a functional core, ``(x, y) -> (x_mixed, y_soft)`` transforms and data samplers."""
from . import functional
from .audio import BeatSyncMixup, LatentBeatSyncMixup, track_beats
from .avmix import AVMix
from .collate import MixCollate
from .lightning import MixingMixin
from .classwise import ClasswiseMixup, class_prototypes, loss_classwise_mixup
from .samplers import ReturnWeightedSampler, SkillItSampler
from .mixup_cutmix import MODES, CutMix, MixUp, MixUpCutMix
from .patchmix import PatchMix
from .record import MixRecord
from .transmix import CLSAttentionHook, TransMix, attach_transmix, cls_attention_from_qk, transmix_lambda

__all__ = ["functional", "MixRecord", "MixUpCutMix", "MixUp", "CutMix", "MODES", "PatchMix", "MixCollate", "MixingMixin", "BeatSyncMixup", "LatentBeatSyncMixup", "track_beats", "AVMix",
           "ClasswiseMixup", "class_prototypes", "loss_classwise_mixup", "ReturnWeightedSampler", "SkillItSampler",
           "TransMix", "CLSAttentionHook", "attach_transmix", "cls_attention_from_qk", "transmix_lambda"]
