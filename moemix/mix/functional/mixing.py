"""Applying a mixing record to a batch, out of place, for any modality.

``mixed[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]`` (mixup, Zhang et al. ICLR 2018), or the partner
pasted where a mask/box is set (CutMix, Yun et al. ICCV 2019; Patch Mixing, arXiv 2306.17848).

Mixed dims: the dims a box or mask covers. By default ``[B, C, H, W]`` and ``[B, C, T, H, W]`` use the last
two (``H, W``; video boxes are tubes through time), ``[B, T, D]`` sequences and ``[B, L]`` waveforms use
dim 1 (spans of tokens or samples).

Implementation (chosen by ``benchmarks/mix.py``): interpolation is three large kernels into one new buffer
(gather partners, scale, add the weighted own sample), for scalar and per-sample lambda alike; CutMix copies
the input once and pastes only the box regions (one gathered slice per batch, or one slice per sample).
Python row loops of full-size ops lose badly on a shared CPU, where every op pays a thread-pool barrier.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .boxes import boxes_to_mask

__all__ = ["default_mixed_dims", "normalize_dims", "mix", "mix_boxes", "mix_per_sample", "mix_attention_mask"]


def default_mixed_dims(x: torch.Tensor) -> tuple[int, ...]:
    """``(H, W)`` dims for images/video, dim 1 for ``[B, T, D]`` and ``[B, L]``."""
    return (x.dim() - 2, x.dim() - 1) if x.dim() >= 4 else (1,)


def normalize_dims(x: torch.Tensor, dims: Sequence[int] | None) -> tuple[int, ...]:
    """The mixed dims of ``x`` as ascending non-negative ints (``default_mixed_dims`` for None); boxes and
    sizes are always listed in this order. Raises for a dim outside ``x``, the batch dim or a repeat."""
    if dims is None:
        return default_mixed_dims(x)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or not -x.dim() <= d < x.dim():
            raise ValueError(f"dims must be dims of the {x.dim()}-d input, in [{-x.dim()}, {x.dim()}), got {tuple(dims)}")
    norm = tuple(sorted(d % x.dim() for d in dims))
    if 0 in norm:
        raise ValueError(f"dims must not include the batch dim 0, got {tuple(dims)}")
    if len(set(norm)) != len(norm):
        raise ValueError(f"dims must not repeat a dim, got {tuple(dims)}")
    return norm


def _row_loop(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _view(x: torch.Tensor, dims: Sequence[int]) -> list[int]:
    return [x.shape[0]] + [x.shape[d] if d in dims else 1 for d in range(1, x.dim())]


def _partners(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` in a new tensor with ``x``'s memory format (channels-last batches stay channels-last)."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=last):
            return x[idx]  # advanced indexing keeps the memory format (index_select makes it contiguous)
    return x.index_select(0, idx)


def mix(x: torch.Tensor, lam: torch.Tensor | float | None, perm: torch.Tensor, mask: torch.Tensor | None = None,
        *, dims: Sequence[int] | None = None) -> torch.Tensor:
    """Mix every sample with its partner ``x[perm[i]]``; the input is never modified.

    Args:
        x: ``[B, ...]`` floating point batch.
        lam: share kept from the sample itself: a float, a 0-d tensor, or ``[B]``. Ignored when ``mask`` is given.
        perm: ``[B]`` partner indices (see ``pair_indices``).
        mask: optional bool ``[B, *sizes]`` (or ``[*sizes]``) over the mixed dims, True where the partner is
            pasted (CutMix, Patch Mixing).
        dims: the mixed dims for ``mask``. Defaults to ``default_mixed_dims(x)``.

    Returns:
        a new tensor shaped like ``x``.
    """
    b = x.shape[0]
    idx = perm.to(x.device)
    if mask is not None:
        dims = normalize_dims(x, dims)
        sizes = [x.shape[d] for d in dims]
        if mask.dim() == len(dims):
            mask = mask.unsqueeze(0).expand(b, *sizes)
        return torch.where(mask.to(x.device).reshape(_view(x, dims)), _partners(x, idx), x)
    if lam is None:
        raise ValueError("lam must be given when mask is None")
    # few large kernels, all in the one new buffer: gather the partners, scale them, add the weighted own
    # sample. Row loops lose badly when the CPU is shared (every op pays a thread-pool barrier).
    out = _partners(x, idx)
    if isinstance(lam, (int, float)) or (isinstance(lam, torch.Tensor) and lam.dim() == 0):
        lam_f = float(lam)
        return out.mul_(1.0 - lam_f).add_(x, alpha=lam_f)
    lam_t = torch.as_tensor(lam)
    if lam_t.numel() != b:
        raise ValueError(f"lam must be a scalar or have shape [B]=[{b}], got shape {tuple(lam_t.shape)}")
    w = lam_t.to(device=x.device, dtype=x.dtype).view(b, *([1] * (x.dim() - 1)))
    return out.mul_(1.0 - w).addcmul_(x, w)


def mix_boxes(x: torch.Tensor, perm: torch.Tensor, boxes: torch.Tensor, *,
              dims: Sequence[int] | None = None) -> torch.Tensor:
    """Paste ``x[perm[i]]`` into ``x[i]`` inside box ``i`` (``[B, 2n]`` or ``[1, 2n]`` for one shared box).

    Copies only the box regions of the partners, on top of one copy of ``x``.
    """
    dims = normalize_dims(x, dims)
    out = x.clone()
    idx = perm.to(x.device)
    bx = boxes.tolist()

    def region(row):
        sl = [slice(None)] * x.dim()
        for k, d in enumerate(dims):
            sl[d] = slice(row[2 * k], row[2 * k + 1])
        return tuple(sl)

    # Per-sample slice copies: no temporary for the gathered partners (a batch-sized allocation costs
    # more than the loop on CPU; see docs/results/mix.md).
    shared = region(bx[0])[1:] if len(bx) == 1 else None
    for i, j in enumerate(idx.tolist()):
        if j != i:
            sl = shared if shared is not None else region(bx[i])[1:]
            out[i][sl] = x[j][sl]
    return out


def mix_attention_mask(attention_mask: torch.Tensor, perm: torch.Tensor, *, box_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Attention/padding mask of a mixed sequence batch ``[B, T]``.

    Interpolated sequences (mixup) attend wherever either source has a token: ``m | m[perm]``. Spliced
    sequences (a CutMix span, ``box_mask`` ``[B, T]`` True where the partner is pasted) take the partner's
    mask inside the span and their own outside.
    """
    partner = attention_mask[perm.to(attention_mask.device)]
    if box_mask is None:
        if attention_mask.dtype == torch.bool:
            return attention_mask | partner
        return torch.maximum(attention_mask, partner)
    return torch.where(box_mask.to(attention_mask.device), partner, attention_mask)


def mix_per_sample(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor | None = None,
                   use_box: torch.Tensor | None = None, *, dims: Sequence[int] | None = None) -> torch.Tensor:
    """Per-sample mixup or CutMix in one pass (timm's ``elem``/``pair`` modes, without its Python-side copies).

    Args:
        x: ``[B, ...]`` floating point batch.
        perm: ``[B]`` partner indices.
        lam: ``[B]`` share kept from each sample (used by the mixup rows).
        boxes: ``[B, 2n]`` boxes for the CutMix rows.
        use_box: ``[B]`` bool, True for rows mixed by box paste, False for interpolated rows.
        dims: the mixed dims of the boxes. Defaults to ``default_mixed_dims(x)``.
    """
    if boxes is None or use_box is None or not bool(use_box.any()):
        return mix(x, lam, perm)
    dims = normalize_dims(x, dims)
    if not _row_loop(x):
        lam_rows = torch.where(use_box.to(lam.device), torch.ones_like(lam), lam)
        out = mix(x, lam_rows, perm)
        sizes = [x.shape[d] for d in dims]
        mask = boxes_to_mask(boxes, sizes, device=x.device) & use_box.to(x.device).view(-1, *([1] * len(sizes)))
        view = [x.shape[0]] + [x.shape[d] if d in dims else 1 for d in range(1, x.dim())]
        return torch.where(mask.reshape(view), x[perm.to(x.device)], out)
    rows = [(i, j, row) for i, (j, ub, row) in enumerate(zip(perm.tolist(), use_box.tolist(), boxes.tolist()))
            if ub and i != j]
    interp = (~use_box) & (lam < 1) & (perm != torch.arange(perm.numel()))
    # box rows keep lam = 1 in the interpolation pass, then get their partner's box pasted
    out = mix(x, torch.where(interp, lam, torch.ones_like(lam)), perm) if bool(interp.any()) else x.clone()
    for i, j, row in rows:
        sl = [slice(None)] * (x.dim() - 1)
        for k, d in enumerate(dims):
            sl[d - 1] = slice(row[2 * k], row[2 * k + 1])
        out[i][tuple(sl)] = x[j][tuple(sl)]
    return out
