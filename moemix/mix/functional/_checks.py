"""Boundary checks for the mixing code (the shared scalar checks of :mod:`moemix._checks` and the tensor checks of
mixing): each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import torch

from moemix._checks import (as_positive_int, check_choice, check_positive,  # noqa: F401
                            check_positive_int, check_probability)

check_alpha = check_positive  # a Beta concentration: a finite number > 0


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor (mixing interpolates values), got dtype "
                         f"{x.dtype}; convert with x.float() or torchvision's ToDtype(scale=True) first")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one more, expected [B, ...], "
                         f"got shape {tuple(x.shape)}")


def check_minmax(name: str, value) -> None:
    if value is None:
        return
    if len(value) != 2 or not 0.0 < value[0] < value[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min < max <= 1, got {value!r}")
