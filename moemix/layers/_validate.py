"""Argument checks of the layers: the shared scalar checks (:mod:`moemix._checks`) and the layers' own, each
raising ``ValueError`` naming the argument."""
from __future__ import annotations

from typing import Tuple

import torch

from moemix._checks import (check_bool, check_choice, check_nonnegative, check_optional_bool,  # noqa: F401
                            check_positive, check_positive_int, check_probability, is_integer)


def as_pair(name: str, value) -> Tuple:
    """``timm``'s ``to_2tuple`` with a check: a scalar ``v`` -> ``(v, v)``; a pair is kept; else ValueError."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a single value or a pair (first layer, second layer), got {value!r}")
        return tuple(value)
    return value, value


def check_last_dim(who: str, x: torch.Tensor, expected: int) -> None:
    """``x`` is a floating-point ``[..., expected]`` tensor."""
    if not x.is_floating_point():
        raise ValueError(f"{who} expected a floating-point input, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != expected:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"{who} expected input of shape [..., {expected}], got last dimension {got} "
                         f"(shape {tuple(x.shape)})")
