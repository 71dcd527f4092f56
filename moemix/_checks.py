"""Scalar argument checks shared by every moemix sub-package: each raises ``ValueError`` naming the argument.

Numbers may be Python, NumPy or 0-d tensor scalars (not bools); sizes must be Python ints, which are stored and
compared as such.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch

try:
    from numpy import bool_ as _NUMPY_BOOL
except ImportError:  # NumPy is optional for torch
    class _NUMPY_BOOL:  # noqa: N801 (never instantiated: isinstance checks against it are False)
        pass


def is_integer(value) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, _NUMPY_BOOL))


def as_number(value):
    """A 0-d real tensor as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        return value.item()
    return value


def is_finite_real(value) -> bool:
    """A finite real number: Python, NumPy or a 0-d tensor (not a bool, not inf or NaN)."""
    value = as_number(value)
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, _NUMPY_BOOL))
            and math.isfinite(value))


def check_positive_int(name: str, value) -> None:
    """A Python int >= 1 (sizes are stored and compared as Python ints)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def as_positive_int(name: str, value) -> int:
    """A whole number >= 1 of any numeric type (``22050.0``, ``numpy.int64``, a 0-d tensor) as a Python int."""
    value = as_number(value)
    if not isinstance(value, bool) and isinstance(value, numbers.Real) and value >= 1 and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    if not (is_finite_real(value) and as_number(value) >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_positive(name: str, value) -> None:
    if not (is_finite_real(value) and as_number(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_probability(name: str, value) -> float:
    """``value`` in [0, 1] as a Python float, else ``ValueError``."""
    if not (is_finite_real(value) and 0.0 <= as_number(value) <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(as_number(value))


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool if it is one (or a NumPy bool), else ``ValueError``."""
    if not isinstance(value, (bool, _NUMPY_BOOL)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_optional_bool(name: str, value) -> Optional[bool]:
    """None, or ``value`` as a Python bool (:func:`check_bool`)."""
    return None if value is None else check_bool(name, value)


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class ConfigError(ValueError):
    """A configured value that cannot work (an option, a path, a data layout). The message names the option;
    the recipes' command line prints it on one line and exits with status 2."""
