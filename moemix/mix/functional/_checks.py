"""Boundary checks for the mixing code: each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import numbers
from typing import Iterable

import torch


def check_alpha(name: str, value) -> None:
    """Beta concentration must be a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def as_positive_int(name: str, value) -> int:
    """A whole number >= 1 of any numeric type (``22050.0``, ``numpy.int64``, a 0-d tensor) as a Python int."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        value = value.item()
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be a positive whole number, got {value!r}")


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
