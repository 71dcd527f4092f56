"""Classwise mixup of region prototypes and class embeddings (Jeong et al., "ProxyDet: Synthesizing Proxy
Novel Classes via Classwise Mixup for Open-Vocabulary Object Detection", AAAI 2024).

For the base classes present in a batch: ``r_c`` the L2-normalised mean region feature (prototype) of class c,
``t_c`` its L2-normalised text/label embedding. With ``lam ~ Beta(1, 1)`` and a random permutation ``pi`` of the
classes, proxy novel classes are::

    r~ = normalize(lam * r_c + (1 - lam) * r_pi(c))      t~ = normalize(lam * t_c + (1 - lam) * t_pi(c))

and the head is trained to map ``r~`` near ``t~`` (an L1 loss in the paper).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .functional._checks import check_alpha, check_float_tensor
from .functional.lam import sample_beta
from .functional.pairing import pair_indices
from .record import MixRecord

__all__ = ["class_prototypes", "ClasswiseMixup", "loss_classwise_mixup"]


def class_prototypes(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes present and their L2-normalised mean features.

    Args:
        features: ``[N, D]`` region features.
        labels: ``[N]`` class ids.

    Returns:
        ``(classes [C], prototypes [C, D])``.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [N, D] with labels [N], got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    classes, inverse = labels.unique(return_inverse=True)
    sums = torch.zeros(classes.numel(), features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, inverse, features)
    return classes, F.normalize(sums, dim=-1)


class ClasswiseMixup:
    """Mix pairs of class prototypes ``[C, D]`` and their embeddings ``[C, E]`` with the same lambda, renormalised.

    ``(prototypes, embeddings) -> (mixed_prototypes [C, D], mixed_embeddings [C, E])`` (plus the record).

    Args:
        alpha: Beta concentration of lam. Defaults to 1.0 (uniform, the paper).
        per_class: one lam per class pair (True) or one for all (False). Defaults to True.
        return_info: also return the record. Defaults to False.
        generator: optional ``torch.Generator``.

    Setting the attribute ``enabled`` to False (``MixSchedule(off_epoch=...)`` does) keeps every class's own
    prototype and embedding (``lam = 1``, still renormalised).
    """

    def __init__(self, alpha: float = 1.0, *, per_class: bool = True, return_info: bool = False,
                 generator: torch.Generator | None = None) -> None:
        check_alpha("alpha", alpha)
        self.alpha, self.per_class, self.return_info, self.generator = float(alpha), per_class, return_info, generator
        self.enabled = True  # False: lam = 1, each class keeps its own (renormalised) prototype and embedding

    def __call__(self, prototypes: torch.Tensor, embeddings: torch.Tensor):
        check_float_tensor("prototypes", prototypes)
        check_float_tensor("embeddings", embeddings)
        if prototypes.shape[0] != embeddings.shape[0]:
            raise ValueError(f"prototypes and embeddings need one row per class, got {prototypes.shape[0]} and "
                             f"{embeddings.shape[0]}")
        c = prototypes.shape[0]
        perm = pair_indices(c, "random", generator=self.generator).cpu()
        lam = sample_beta(self.alpha, self.alpha, c if self.per_class else 1, generator=self.generator, device="cpu")
        lam = lam.expand(c).clone() if not self.per_class else lam
        if not self.enabled:
            lam = torch.ones_like(lam)
        w = lam.unsqueeze(1)
        r = F.normalize(torch.lerp(prototypes[perm], prototypes, w.to(prototypes)), dim=-1)
        t = F.normalize(torch.lerp(embeddings[perm], embeddings, w.to(embeddings)), dim=-1)
        if self.return_info:
            rec = MixRecord(lam=lam, perm=perm, label_lam=lam, use_box=torch.zeros(c, dtype=torch.bool))
            return r, t, rec
        return r, t


def loss_classwise_mixup(mixed_prototypes: torch.Tensor, mixed_embeddings: torch.Tensor) -> torch.Tensor:
    """ProxyDet's L1 loss between the mapped mixed prototypes and the mixed embeddings (mean over elements)."""
    return F.l1_loss(mixed_prototypes, mixed_embeddings)
