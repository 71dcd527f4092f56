"""The mixing record: everything needed to reproduce, relabel (TransMix) or extend a mix to aligned tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .functional.boxes import boxes_to_mask
from .functional.mixing import mix, mix_attention_mask
from .functional.patches import grid_to_pixels

__all__ = ["MixRecord"]


@dataclass
class MixRecord:
    """What a mixing transform did to a batch of B samples.

    Attributes:
        lam: ``[B]`` share of each sample's own content in the mixed input (after ``correct_lam``; 1 = unmixed).
        perm: ``[B]`` partner indices: sample ``i`` was mixed with ``perm[i]``.
        label_lam: ``[B]`` share of each sample's own label in the target (``lam`` unless decoupled).
        use_box: ``[B]`` bool, True where the partner was pasted in a box (CutMix) rather than interpolated.
        boxes: ``[B, 2n]`` (or ``[1, 2n]``, one box for all) half-open boxes over ``dims``, or None.
        mask: ``[B, *grid]`` bool cell mask (Patch Mixing), True where the partner was pasted, or None.
        targets: ``[B, K]`` soft targets before mixing (one-hot with smoothing), for relabelling.
        dims: the mixed dims of the input the boxes/mask refer to.
        sizes: extents of those dims.
        applied: False when the batch was passed through unmixed (``prob``, ``off_epoch``).
        attention_mask: the mixed attention mask when one was given to the transform.
        extra: method-specific entries (e.g. BeatSync offsets and lengths).
        not_applicable: why :meth:`apply` cannot reproduce this mix (e.g. BeatSync's crops), or None.
    """

    lam: torch.Tensor
    perm: torch.Tensor
    label_lam: torch.Tensor
    use_box: torch.Tensor
    boxes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    dims: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    applied: bool = True
    attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    not_applicable: str | None = None

    def paste_mask(self, *, device=None) -> torch.Tensor | None:
        """Bool ``[B, *sizes]``, True where sample ``i`` shows its partner (boxes or patches), else None."""
        b = self.lam.numel()
        if self.mask is not None:
            return grid_to_pixels(self.mask.to(device), self.sizes)
        if self.boxes is None or not bool(self.use_box.any()):
            return None
        m = boxes_to_mask(self.boxes, self.sizes, device=device)
        if m.shape[0] == 1:
            m = m.expand(b, *self.sizes)
        return m & self.use_box.to(device).view(-1, *([1] * len(self.sizes)))

    def apply(self, t: torch.Tensor, *, dims: Sequence[int] | None = None) -> torch.Tensor:
        """Mix an aligned tensor (segmentation map, depth, second view) the same way as the input.

        Pasted regions (CutMix boxes, patches) are copied for any dtype; interpolated rows need a float
        tensor, and bool tensors (masks) are OR-ed there. ``t`` must share the batch and mixed-dim sizes.
        ``dims`` defaults to the record's own ``dims`` where ``t`` has them with the recorded sizes (the input
        itself, a ``[B, T]`` mask of a ``[B, T, D]`` sequence), else to ``t``'s last ``len(sizes)`` dims (a
        ``[B, H, W]`` map of ``[B, C, H, W]`` images).
        """
        if not self.applied:
            return t
        if self.not_applicable is not None:
            raise ValueError(self.not_applicable)
        if dims is None:
            own = bool(self.dims) and all(0 < d < t.dim() and t.shape[d] == s for d, s in zip(self.dims, self.sizes))
            dims = tuple(self.dims) if own else tuple(range(t.dim() - len(self.sizes), t.dim()))
        paste = self.paste_mask(device=t.device)
        interp = ~self.use_box if self.mask is None else torch.zeros_like(self.use_box)
        interp = interp & (self.lam < 1)
        out = t
        if bool(interp.any()):
            if t.dtype == torch.bool:
                out = torch.where(interp.to(t.device).view(-1, *([1] * (t.dim() - 1))),
                                  mix_attention_mask(t, self.perm), t)
            elif t.is_floating_point():
                out = mix(t, torch.where(interp, self.lam, torch.ones_like(self.lam)), self.perm)
            else:
                raise ValueError(f"cannot interpolate a tensor of dtype {t.dtype}: mixup rows need a float "
                                 "tensor (soft masks) or a bool one (OR-ed)")
        if paste is not None:
            out = torch.where(_expand(paste, t, dims), t[self.perm.to(t.device)], out)
        return out


def _expand(mask: torch.Tensor, t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    dims = tuple(d % t.dim() for d in dims)
    view = [t.shape[0]] + [t.shape[d] if d in dims else 1 for d in range(1, t.dim())]
    return mask.reshape(view)
