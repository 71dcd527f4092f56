"""Patch Mixing (Lee et al., "Hardwiring ViT Patch Selectivity into CNNs using Patch Mixing",
arXiv 2306.17848): replace a random fraction ``r`` of the cells of a patch grid with the partner's cells at the
same positions; target ``(1 - r) y_own + r y_partner`` (then label smoothing on index labels).

The paper gives no public code; the distribution of ``r`` and the apply probability are not specified
(*unverified*). Here ``r ~ U(ratio_range)`` per sample by default, or a fixed ``ratio``; the label weight is
the share of pixels actually replaced, which equals ``round(r * cells) / cells`` whenever the grid divides
the image.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .functional._checks import check_choice, check_float_tensor, check_positive_int, check_probability
from .functional.mixing import default_mixed_dims, mix
from .functional.pairing import PAIRINGS, pair_indices
from .functional.patches import grid_to_pixels, patch_masks
from .functional.targets import batch_targets, mix_targets
from .record import MixRecord

__all__ = ["PatchMix"]


class PatchMix:
    """Replace a fraction of grid patches with the partner's patches, labels by the replaced fraction.

    Shapes: ``x`` ``[B, C, H, W]`` (or ``[B, C, T, H, W]``, patches are tubes), ``y`` ``[B]`` or ``[B, K]``;
    returns ``(x_mixed, y_soft [B, K])`` and a :class:`MixRecord` (``mask`` is the ``[B, gh, gw]`` cell mask)
    when ``return_info=True``.

    Args:
        grid: ``(gh, gw)`` patch grid, e.g. ``(14, 14)`` for 16-px patches at 224, or one int for a square
            grid. Defaults to (14, 14).
        ratio: fixed fraction of patches to replace, or None to draw it per sample. Defaults to None.
        ratio_range: ``(low, high)`` of the uniform draw when ``ratio`` is None. Defaults to (0, 1).
        prob: probability of mixing each sample. Defaults to 1.0. Setting the attribute ``enabled`` to False
            (``MixSchedule(off_epoch=...)`` does) passes batches through with their soft targets.
        label_smoothing: eps for index labels. Defaults to 0.0.
        num_classes: K; required for index labels.
        pairing: see ``pair_indices``. Defaults to ``"flip"``.
        return_info: also return the record. Defaults to False.
        generator: optional ``torch.Generator``.

    Example:
        >>> pm = PatchMix(grid=(4, 4), ratio=0.25, num_classes=3)
        >>> xm, ym = pm(torch.rand(2, 3, 16, 16), torch.tensor([0, 2]))
        >>> ym[0].tolist()
        [0.75, 0.0, 0.25]
    """

    def __init__(self, grid: int | Sequence[int] = (14, 14), *, ratio: float | None = None,
                 ratio_range: Sequence[float] = (0.0, 1.0), prob: float = 1.0, label_smoothing: float = 0.0,
                 num_classes: int | None = None, pairing: str = "flip", return_info: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(grid, int) and not isinstance(grid, bool):
            grid = (grid, grid)
        if not isinstance(grid, Sequence) or len(grid) != 2:
            raise ValueError(f"grid must be an int or (gh, gw), got {grid!r}")
        for g in grid:
            check_positive_int("grid", g)
        if ratio is not None:
            check_probability("ratio", ratio)
        if len(ratio_range) != 2 or not 0.0 <= ratio_range[0] <= ratio_range[1] <= 1.0:
            raise ValueError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, got {ratio_range!r}")
        check_probability("prob", prob)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        check_choice("pairing", pairing, PAIRINGS)
        self.grid = tuple(grid)
        self.ratio = None if ratio is None else float(ratio)
        self.ratio_range = tuple(ratio_range)
        self.prob = float(prob)
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.pairing = pairing
        self.return_info = return_info
        self.generator = generator
        self.enabled = True  # False passes batches through (targets still soft), e.g. MixSchedule(off_epoch=...)

    def _rand(self, n: int) -> torch.Tensor:
        src = self.generator.device if self.generator is not None else "cpu"
        return torch.rand(n, generator=self.generator, device=src).cpu()

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        check_float_tensor("x", x)
        if x.dim() < 4:
            raise ValueError(f"PatchMix expects images [B, C, H, W] or video [B, C, T, H, W], got {tuple(x.shape)}")
        dims = default_mixed_dims(x)
        sizes = tuple(x.shape[d] for d in dims)
        if sizes[0] < self.grid[0] or sizes[1] < self.grid[1]:
            raise ValueError(f"image of size {sizes} is smaller than the patch grid {self.grid}: each grid cell "
                             "needs at least one pixel")
        y_soft = batch_targets(y, x, self.num_classes, self.label_smoothing)
        b = x.shape[0]
        perm = pair_indices(b, self.pairing, generator=self.generator).cpu()
        if self.ratio is not None:
            r = torch.full((b,), float(self.ratio))
        else:
            lo, hi = self.ratio_range
            r = lo + (hi - lo) * self._rand(b)
        r = torch.where(self._rand(b) < (self.prob if self.enabled else 0.0), r, torch.zeros_like(r))
        r = torch.where(perm == torch.arange(b), torch.zeros_like(r), r)
        cells = patch_masks(self.grid, r, generator=self.generator, device="cpu")
        pixels = grid_to_pixels(cells, sizes)
        lam = 1.0 - pixels.flatten(1).float().mean(dim=1)
        x_mixed = mix(x, None, perm, pixels, dims=dims)
        y_mixed = mix_targets(y_soft, lam, perm)
        if self.return_info:
            record = MixRecord(lam=lam, perm=perm, label_lam=lam, use_box=torch.zeros(b, dtype=torch.bool),
                               mask=cells, targets=y_soft, dims=dims, sizes=sizes, applied=True)
            return x_mixed, y_mixed, record
        return x_mixed, y_mixed
