"""Argument checks shared by the layers: each raises ``ValueError`` naming the argument."""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional, Tuple

import torch

try:
    from numpy import bool_ as _NUMPY_BOOL
except ImportError:  # NumPy is optional for torch
    class _NUMPY_BOOL:  # noqa: N801 (never instantiated: isinstance checks against it are False)
        pass


def is_integer(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, _NUMPY_BOOL))


def check_positive_int(name: str, value) -> None:
    """A Python int >= 1 (sizes are stored and compared as Python ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _number(value):
    """A 0-d real tensor as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        return value.item()
    return value


def _is_real(value) -> bool:
    """A finite real number: Python, NumPy or a 0-d tensor (not a bool, not inf or NaN)."""
    value = _number(value)
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, _NUMPY_BOOL))
            and math.isfinite(value))


def check_nonnegative(name: str, value) -> None:
    if not (_is_real(value) and _number(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    if not (_is_real(value) and _number(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value) -> None:
    if not (_is_real(value) and 0.0 <= _number(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool if it is one (or a NumPy bool), else ``ValueError``."""
    if not isinstance(value, (bool, _NUMPY_BOOL)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_optional_bool(name: str, value) -> Optional[bool]:
    """None, or ``value`` as a Python bool (:func:`check_bool`)."""
    return None if value is None else check_bool(name, value)


def as_pair(name: str, value) -> Tuple:
    """``timm``'s ``to_2tuple`` with a check: a scalar ``v`` -> ``(v, v)``; a pair is kept; else ValueError."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a single value or a pair (first layer, second layer), got {value!r}")
        return tuple(value)
    return value, value


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_last_dim(who: str, x: torch.Tensor, expected: int) -> None:
    """``x`` is a floating-point ``[..., expected]`` tensor."""
    if not x.is_floating_point():
        raise ValueError(f"{who} expected a floating-point input, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != expected:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"{who} expected input of shape [..., {expected}], got last dimension {got} "
                         f"(shape {tuple(x.shape)})")
