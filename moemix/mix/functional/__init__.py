"""Functional core of ``moemix.mix``: pure functions on tensors, any device, optional ``generator=``."""
from .boxes import box_fraction, boxes_to_mask, rand_boxes, rand_boxes_minmax
from .lam import sample_beta, sample_lambda
from .mixing import default_mixed_dims, mix, mix_attention_mask, mix_boxes, mix_per_sample, normalize_dims
from .pairing import PAIRINGS, is_involution, pair_indices
from .patches import grid_to_pixels, patch_masks
from .targets import mix_targets, soft_targets

__all__ = [
    "sample_beta", "sample_lambda",
    "PAIRINGS", "pair_indices", "is_involution",
    "rand_boxes", "rand_boxes_minmax", "box_fraction", "boxes_to_mask",
    "patch_masks", "grid_to_pixels",
    "default_mixed_dims", "normalize_dims", "mix", "mix_boxes", "mix_per_sample", "mix_attention_mask",
    "soft_targets", "mix_targets",
]
