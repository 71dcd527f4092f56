"""Random CutMix boxes over the mixed dimensions of a sample (2-D for images/video, 1-D for sequences/audio).

A box is stored as ``[B, 2 * n]`` int64 ``(lo_0, hi_0, lo_1, hi_1, ...)``, half-open, one row per sample.
For images ``n = 2`` and a row reads ``(yl, yh, xl, xh)`` as in timm.

- ``rand_boxes(sizes, lam)``: Yun et al., "CutMix" (ICCV 2019), timm flavour: each side is
  ``int(size * (1 - lam) ** (1 / n))`` (``sqrt`` for images), centre uniform, clipped at the border.
- ``rand_boxes_minmax(sizes, minmax)``: Darknet/timm ``cutmix_minmax``: each side uniform in
  ``[int(min * size), int(max * size))``, placed fully inside.
- ``box_fraction(boxes, sizes)``: the box's share of the sample, so ``correct_lam`` is ``1 - box_fraction``.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["rand_boxes", "rand_boxes_minmax", "box_fraction", "boxes_to_mask"]


def _randint(low: torch.Tensor, high: torch.Tensor, generator, device) -> torch.Tensor:
    """Elementwise uniform integers in [low, high) (high > low)."""
    u = torch.rand(low.shape, dtype=torch.float64, generator=generator, device=device)
    return (low + (u * (high - low)).floor().long()).clamp(max=high - 1)


def rand_boxes(sizes: Sequence[int], lam: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boxes whose unclipped volume fraction is ``1 - lam``.

    Args:
        sizes: extents of the mixed dims, e.g. ``(H, W)`` or ``(T,)``.
        lam: ``[B]`` or 0-d tensor of target lambdas (the share kept from the sample itself).
        generator: source of randomness.

    Returns:
        ``[B, 2 * len(sizes)]`` int64 on CPU (``[1, 2n]`` for a 0-d ``lam``).
    """
    src = generator.device if generator is not None else torch.device("cpu")
    lam = lam.detach().reshape(-1).double().to(src)
    n = len(sizes)
    ratio = (1.0 - lam).clamp_min(0.0) ** (1.0 / n)
    cols = []
    for size in sizes:
        cut = (size * ratio).long()  # int() truncation, as timm
        centre = _randint(torch.zeros_like(cut), torch.full_like(cut, size), generator, src)
        cols += [(centre - cut // 2).clamp(0, size), (centre + (cut + 1) // 2).clamp(0, size)]
    return torch.stack(cols, dim=1).cpu()


def rand_boxes_minmax(sizes: Sequence[int], minmax: Sequence[float], batch_size: int = 1, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Rectangles with each side uniform in ``[min * size, max * size)``, fully inside the sample.

    Returns:
        ``[batch_size, 2 * len(sizes)]`` int64 on CPU.
    """
    src = generator.device if generator is not None else torch.device("cpu")
    cols = []
    for size in sizes:
        lo = torch.full((batch_size,), int(size * minmax[0]), dtype=torch.long, device=src)
        hi = torch.full((batch_size,), max(int(size * minmax[1]), int(size * minmax[0]) + 1), dtype=torch.long,
                        device=src)
        cut = _randint(lo, hi, generator, src)
        start = _randint(torch.zeros_like(cut), size - cut + 1, generator, src)
        cols += [start, start + cut]
    return torch.stack(cols, dim=1).cpu()


def box_fraction(boxes: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Share of the sample covered by each box: ``[B]`` float32 in [0, 1]."""
    extent = (boxes[:, 1::2] - boxes[:, 0::2]).double().prod(dim=1)
    total = 1.0
    for s in sizes:
        total *= s
    return (extent / total).float()


def boxes_to_mask(boxes: torch.Tensor, sizes: Sequence[int], *, device=None) -> torch.Tensor:
    """Boolean masks ``[B, *sizes]``, True inside each box (where the partner is pasted)."""
    masks = torch.ones((boxes.shape[0], *sizes), dtype=torch.bool, device=device)
    for d, size in enumerate(sizes):
        pos = torch.arange(size, device=device)
        lo = boxes[:, 2 * d].to(device).view(-1, 1)
        hi = boxes[:, 2 * d + 1].to(device).view(-1, 1)
        inside = (pos >= lo) & (pos < hi)  # [B, size]
        shape = [boxes.shape[0]] + [1] * len(sizes)
        shape[1 + d] = size
        masks = masks & inside.view(shape)
    return masks
