"""Patch-grid masks for Patch Mixing (Lee et al., "Hardwiring ViT Patch Selectivity into CNNs using
Patch Mixing", arXiv 2306.17848): on a ``gh x gw`` grid a fraction ``r`` of the cells is taken from the
partner image at the same positions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["patch_masks", "grid_to_pixels"]


def patch_masks(grid: Sequence[int], ratio: torch.Tensor, *, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Random cell masks with exactly ``round(ratio[i] * gh * gw)`` cells set in row ``i``.

    Args:
        grid: ``(gh, gw)`` cells (any number of dims works: ``(gt, gh, gw)`` for video tubes).
        ratio: ``[B]`` fractions in [0, 1] of cells to replace.
        generator: source of randomness.
        device: device of the result.

    Returns:
        bool ``[B, *grid]``, True where the partner's patch is pasted.
    """
    src = generator.device if generator is not None else torch.device("cpu")
    ratio = ratio.detach().reshape(-1).double().to(src)
    cells = 1
    for g in grid:
        cells *= g
    count = torch.round(ratio * cells).long()  # [B]
    scores = torch.rand((ratio.numel(), cells), generator=generator, device=src)
    rank = scores.argsort(dim=1).argsort(dim=1)  # a uniformly random rank per cell
    mask = rank < count.unsqueeze(1)
    return mask.view(ratio.numel(), *grid).to(device if device is not None else src)


def grid_to_pixels(mask: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a cell mask ``[B, *grid]`` to ``[B, *sizes]`` (pixels)."""
    if tuple(mask.shape[1:]) == tuple(sizes):
        return mask
    up = F.interpolate(mask.unsqueeze(1).to(torch.uint8), size=tuple(sizes), mode="nearest")
    return up.squeeze(1).bool()
