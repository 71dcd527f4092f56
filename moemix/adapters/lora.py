"""LoRA (Hu et al., ICLR 2022, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen ``nn.Linear``
plus a trainable low-rank update ``(alpha / r) * B A``.

``A [r, in]`` starts Kaiming-uniform and ``B [out, r]`` at zero (the reference code ``microsoft/LoRA`` and
peft), so a fresh adapter leaves the layer's function unchanged. For a fused projection such as timm's
``qkv``, ``enable`` splits the output into equal parts and adapts only some of them (loralib's
``MergedLinear``), e.g. ``(True, False, True)`` for q and v.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moemix._checks import check_positive, check_positive_int, check_probability

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * B A dropout(x)`` with ``base`` frozen.

    Args:
        base: the pretrained ``nn.Linear``; its parameters are set to ``requires_grad=False``.
        r: rank. Defaults to 8.
        alpha: scaling numerator (``alpha / r``). Defaults to 16.
        dropout: dropout on the adapter's input. Defaults to 0.05.
        enable: which of ``len(enable)`` equal slices of the output get an update. Defaults to all.

    Shapes: ``[..., in] -> [..., out]``. :meth:`merge` folds the update into ``base.weight`` (inference
    without extra cost); :meth:`unmerge` takes it out again.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                 enable: Optional[Sequence[bool]] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        check_positive_int("r", r)
        check_positive("alpha", alpha)
        check_probability("dropout", dropout)
        enable = (True,) if enable is None else tuple(bool(e) for e in enable)
        if not enable or not any(enable) or base.out_features % len(enable):
            raise ValueError(f"enable must split out_features={base.out_features} into equal slices with at least "
                             f"one enabled, got {enable}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.enable = r, float(alpha), float(alpha) / r, enable
        slice_width = base.out_features // len(enable)
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **dd))
        self.lora_B = nn.Parameter(torch.zeros(slice_width * sum(enable), r, **dd))
        self.dropout = nn.Dropout(dropout)
        rows = torch.arange(base.out_features, device=base.weight.device).view(len(enable), slice_width)
        self.register_buffer("_rows", rows[torch.tensor(enable, device=rows.device)].reshape(-1), persistent=False)
        self.merged = False
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged or not), for code that reads ``layer.weight``."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The update ``[out, in]`` that :meth:`merge` adds to ``base.weight``."""
        delta = self.lora_B.new_zeros(self.out_features, self.in_features)
        return delta.index_copy(0, self._rows, self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        if len(self._rows) == self.out_features:
            return y + update
        return y.index_add(-1, self._rows, update.to(y.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight``; the adapter is skipped until :meth:`unmerge`."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``base.weight`` again (exact up to rounding)."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        enabled = "" if all(self.enable) else f", enable={self.enable}"
        return f"r={self.r}, alpha={self.alpha:g}{enabled}, merged={self.merged}"
