"""Soft targets for mixed batches: one-hot with label smoothing, then interpolated with the partner's.

Label smoothing as timm's ``mixup_target``: ``off = eps / K``, ``on = 1 - eps + eps / K`` (Szegedy et al.,
"Rethinking the Inception Architecture", CVPR 2016). Soft labels ``[B, K]`` pass through unchanged, so
transforms chain (e.g. CutMix after MixUp) and already-smoothed targets are not smoothed twice.
"""
from __future__ import annotations

import torch

__all__ = ["soft_targets", "mix_targets", "batch_targets"]


def soft_targets(y: torch.Tensor, num_classes: int | None = None, *, label_smoothing: float = 0.0,
                 dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Turn index labels ``[B]`` (int) or soft labels ``[B, K]`` (float) into ``[B, K]`` float targets.

    Args:
        y: ``[B]`` integer class indices in ``[0, num_classes)``, or ``[B, K]`` float soft labels.
        num_classes: K. Required for index labels; checked against soft labels when given.
        label_smoothing: eps in [0, 1), applied to index labels only.
        dtype: dtype of the result. Defaults to float32.
        device: device of the result. Defaults to ``y.device``.

    Raises:
        ValueError: index labels without ``num_classes``, labels outside ``[0, num_classes)``, or a soft
            label width different from ``num_classes``.
    """
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
    device = y.device if device is None else device
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"soft labels y must have shape [B, K], got {tuple(y.shape)}")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"soft labels y have {y.shape[1]} classes but num_classes={num_classes}")
        return y.to(device=device, dtype=dtype)
    if y.dim() != 1:
        raise ValueError(f"index labels y must have shape [B], got {tuple(y.shape)}")
    if num_classes is None:
        raise ValueError("num_classes is required with index labels y (pass num_classes=K, or give soft "
                         "labels of shape [B, K])")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels y must be in [0, num_classes={num_classes}), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    out = torch.full((y.shape[0], num_classes), off, dtype=dtype, device=device)
    return out.scatter_(1, y.to(device).long().view(-1, 1), on)


def mix_targets(y_soft: torch.Tensor, lam: torch.Tensor | float, perm: torch.Tensor) -> torch.Tensor:
    """``lam[i] * y[i] + (1 - lam[i]) * y[perm[i]]`` for soft targets ``[B, K]``; ``lam`` scalar or ``[B]``."""
    lam_t = torch.as_tensor(lam, dtype=y_soft.dtype, device=y_soft.device)
    if lam_t.dim() == 1:
        lam_t = lam_t.unsqueeze(1)
    return torch.lerp(y_soft[perm.to(y_soft.device)], y_soft, lam_t)


def batch_targets(y: torch.Tensor, x: torch.Tensor, num_classes: int | None, label_smoothing: float) -> torch.Tensor:
    """:func:`soft_targets` for the batch ``x``: one label per sample, on ``x``'s device, float32 at least
    (bf16/fp16 inputs would round the targets; timm's are float32)."""
    y_soft = soft_targets(y, num_classes, label_smoothing=label_smoothing,
                          dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if y_soft.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label per sample: x has B={x.shape[0]}, y has {y_soft.shape[0]}")
    return y_soft
