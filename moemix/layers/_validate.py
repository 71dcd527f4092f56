"""Argument checks of the layers: the shared scalar checks (:mod:`moemix._checks`) and the layers' own, each
raising ``ValueError`` naming the argument."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from moemix._checks import (check_bool, check_choice, check_nonnegative, check_optional_bool,  # noqa: F401
                            check_positive, check_positive_int, check_probability, is_integer)


def as_pair(name: str, value, check) -> Tuple:
    """timm's ``to_2tuple`` (``v`` -> ``(v, v)``), each element through ``check(name or name[i], v) -> v``."""
    if not isinstance(value, (tuple, list)):
        return (check(name, value),) * 2
    if len(value) != 2:
        raise ValueError(f"{name} must be a single value or a pair (first layer, second layer), got {value!r}")
    return tuple(check(f"{name}[{i}]", v) for i, v in enumerate(value))


def check_last_dim(who: str, x: torch.Tensor, expected: int, dtype: Optional[torch.dtype] = None) -> None:
    """``x`` is a floating-point ``[..., expected]`` tensor, of ``dtype`` (the parameters') unless autocast is on
    for its device, as ``nn.Linear`` requires."""
    if not x.is_floating_point():
        raise ValueError(f"{who} expected a floating-point input, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype and not (x.is_meta or torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"{who} expected input of dtype {dtype} (its parameters'), got {x.dtype}: cast the input "
                         "or the layer, or run it under torch.autocast")
    if x.dim() < 1 or x.shape[-1] != expected:
        got = x.shape[-1] if x.dim() else "a 0-d tensor"
        raise ValueError(f"{who} expected input of shape [..., {expected}], got last dimension {got} "
                         f"(shape {tuple(x.shape)})")
