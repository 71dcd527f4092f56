"""MixUp, CutMix and their per-batch/per-sample switch, as out-of-place ``(x, y) -> (x_mixed, y_soft)`` transforms.

Papers: Zhang et al., "mixup: Beyond Empirical Risk Minimization" (ICLR 2018); Yun et al., "CutMix:
Regularization Strategy to Train Strong Classifiers with Localizable Features" (ICCV 2019); Zou et al.,
"The Benefits of Mixup for Feature Learning" (ICML 2023) for the decoupled label lambda and early stopping.

The parameter names and defaults follow timm's ``Mixup`` so configs port unchanged; what differs is what its
users asked for: any batch size (odd ones too), never in place, ``prob`` drawn once per decision, per-sample
boxes in the per-sample modes, the true lambda after box clipping (``correct_lam``), a ``torch.Generator``
instead of global numpy state, and the mixing record on request.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .functional._checks import (check_alpha, check_choice, check_float_tensor, check_minmax, check_positive_int,
                                 check_probability)
from .functional.boxes import box_fraction, rand_boxes, rand_boxes_minmax
from .functional.lam import sample_beta
from .functional.mixing import mix, mix_boxes, mix_per_sample, normalize_dims
from .functional.pairing import PAIRINGS, is_involution, pair_indices
from .functional.targets import batch_targets, mix_targets
from .record import MixRecord

__all__ = ["MixUpCutMix", "MixUp", "CutMix", "MODES"]

MODES = ("batch", "pair", "elem")


class MixUpCutMix:
    """MixUp or CutMix per batch, per pair or per sample, on any ``[B, ...]`` float batch.

    Shapes: ``x`` ``[B, C, H, W]``, ``[B, C, T, H, W]`` (boxes are tubes over H, W), ``[B, T, D]`` or ``[B, L]``
    (boxes are spans over dim 1); ``y`` ``[B]`` int labels or ``[B, K]`` soft labels. Returns
    ``(x_mixed [same as x], y_soft [B, K])``, plus a :class:`MixRecord` when ``return_info=True``. For the
    pair ``(i, perm[i])``: ``x_mixed[i] = lam[i] x[i] + (1 - lam[i]) x[perm[i]]`` (or the partner pasted in
    a box covering ``1 - lam[i]`` of the sample) and ``y_soft[i] = l[i] y[i] + (1 - l[i]) y[perm[i]]`` with
    ``l = label_lam_fn(lam)`` (``lam`` by default).

    Args:
        mixup_alpha: Beta concentration of mixup; 0 turns mixup off. Defaults to 1.0.
        cutmix_alpha: Beta concentration of CutMix; 0 turns CutMix off. Defaults to 0.0.
        cutmix_minmax: ``(min, max)`` box side ratios; enables CutMix with minmax boxes. Defaults to None.
        prob: probability of mixing a batch (``mode="batch"``) or a sample/pair. Defaults to 1.0.
        switch_prob: probability of CutMix instead of mixup when both are on. Defaults to 0.5.
        mode: ``"batch"`` (one lam/box), ``"pair"`` (per pair, both ways), ``"elem"`` (per sample).
            Defaults to ``"batch"``.
        correct_lam: set lam to ``1 - box area fraction`` after clipping at the border. Defaults to True.
        label_smoothing: eps for index labels. Defaults to 0.1 (timm).
        num_classes: K; required for index labels. Defaults to None.
        pairing: ``"flip"`` (timm), ``"roll"`` (torchvision), ``"random"`` or ``"random_pairs"``.
            Defaults to ``"flip"``. ``mode="pair"`` needs ``"flip"`` or ``"random_pairs"``.
        label_lam_fn: maps the input lam ``[B]`` to the label lam ``[B]`` (decoupled label lambda). Defaults
            to None (same lam).
        off_epoch: stop mixing from this epoch on (early-stopped mixup); see :meth:`set_epoch`.
        dims: the mixed dims boxes cover. Defaults to ``(H, W)`` for 4-D/5-D input and dim 1 otherwise.
        return_info: also return the :class:`MixRecord`. Defaults to False.
        generator: ``torch.Generator`` for all random draws. Defaults to torch's global RNG.

    Example:
        >>> mixer = MixUpCutMix(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.rand(5, 3, 32, 32), torch.randint(0, 10, (5,))
        >>> xm, ym = mixer(x, y)
        >>> xm.shape, ym.shape, bool(torch.allclose(ym.sum(1), torch.ones(5)))
        (torch.Size([5, 3, 32, 32]), torch.Size([5, 10]), True)
    """

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0,
                 cutmix_minmax: Sequence[float] | None = None, prob: float = 1.0, switch_prob: float = 0.5,
                 mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.1,
                 num_classes: int | None = None, *, pairing: str = "flip",
                 label_lam_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 off_epoch: int | None = None, dims: Sequence[int] | None = None,
                 return_info: bool = False, generator: torch.Generator | None = None) -> None:
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0 (0 turns it off), got {value!r}")
        check_minmax("cutmix_minmax", cutmix_minmax)
        if cutmix_minmax is not None and cutmix_alpha == 0:
            cutmix_alpha = 1.0  # minmax boxes switch CutMix on, as in timm
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: at least one must be > 0 "
                             "(or cutmix_minmax set)")
        check_probability("prob", prob)
        check_probability("switch_prob", switch_prob)
        check_choice("mode", mode, MODES)
        check_choice("pairing", pairing, PAIRINGS)
        if mode == "pair" and pairing not in ("flip", "random_pairs"):
            raise ValueError(f"mode='pair' mixes both members of a pair, so pairing must be 'flip' or "
                             f"'random_pairs', got {pairing!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        if off_epoch is not None and (isinstance(off_epoch, bool) or not isinstance(off_epoch, int) or off_epoch < 0):
            raise ValueError(f"off_epoch must be an int >= 0 or None, got {off_epoch!r}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.cutmix_minmax = tuple(cutmix_minmax) if cutmix_minmax is not None else None
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.mode = mode
        self.correct_lam = correct_lam
        self.label_smoothing = float(label_smoothing)
        self.num_classes = num_classes
        self.pairing = pairing
        self.label_lam_fn = label_lam_fn
        self.off_epoch = off_epoch
        self.dims = tuple(dims) if dims is not None else None
        self.return_info = return_info
        self.generator = generator
        self.enabled = True  # timm's ``mixup_enabled``; set False (or use off_epoch) to pass batches through

    # -- schedule hooks -------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Turn mixing off from ``off_epoch`` on (early-stopped mixup, Zou et al. 2023; timm's --mixup-off-epoch)."""
        if self.off_epoch is not None:
            self.enabled = epoch < self.off_epoch

    # -- randomness -----------------------------------------------------------------------------------------
    def _rand(self, n: int) -> torch.Tensor:
        src = self.generator.device if self.generator is not None else "cpu"
        return torch.rand(n, generator=self.generator, device=src).cpu()

    def _beta(self, alpha: float, n: int) -> torch.Tensor:
        return sample_beta(alpha, alpha, n, generator=self.generator, device="cpu")

    def _draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(apply [n] bool, use_cutmix [n] bool, lam [n]) for n independent decisions; prob drawn once each."""
        apply = self._rand(n) < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = self._rand(n) < self.switch_prob
            lam = torch.where(use_cutmix, self._beta(self.cutmix_alpha, n), self._beta(self.mixup_alpha, n))
        elif self.mixup_alpha > 0:
            use_cutmix = torch.zeros(n, dtype=torch.bool)
            lam = self._beta(self.mixup_alpha, n)
        else:
            use_cutmix = torch.ones(n, dtype=torch.bool)
            lam = self._beta(self.cutmix_alpha, n)
        lam = torch.where(apply, lam, torch.ones_like(lam))
        return apply, use_cutmix & apply, lam

    def _boxes(self, sizes, lam: torch.Tensor, n: int) -> torch.Tensor:
        if self.cutmix_minmax is not None:
            return rand_boxes_minmax(sizes, self.cutmix_minmax, n, generator=self.generator)
        return rand_boxes(sizes, lam, generator=self.generator)

    # -- the transform --------------------------------------------------------------------------------------
    def _labels(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return batch_targets(y, x, self.num_classes, self.label_smoothing)

    def _params(self, b: int, sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """perm, lam [B], use_box [B], boxes ([1, 2n] batch mode or [B, 2n]), applied."""
        perm = pair_indices(b, self.pairing, generator=self.generator)
        if self.mode == "batch":
            apply, use_cut, lam = self._draw(1)
            boxes = None
            if bool(use_cut[0]):
                boxes = self._boxes(sizes, lam, 1)
                if self.correct_lam or self.cutmix_minmax is not None:
                    lam = 1.0 - box_fraction(boxes, sizes)
            return perm.cpu(), lam.expand(b).clone(), use_cut.expand(b).clone(), boxes, bool(apply[0])
        perm = perm.cpu()
        lead = None
        if self.mode == "pair":
            if not is_involution(perm):
                raise ValueError("mode='pair' needs an involutive pairing")
            lead = torch.nonzero(perm >= torch.arange(b)).squeeze(1)  # one decision per pair
            apply_l, cut_l, lam_l = self._draw(lead.numel())
            apply, use_cut, lam = (torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool), torch.ones(b))
            for t, src in ((apply, apply_l), (use_cut, cut_l), (lam, lam_l)):
                t[lead] = src
                t[perm[lead]] = src
        else:
            apply, use_cut, lam = self._draw(b)
        boxes = None
        if bool(use_cut.any()):
            boxes = self._boxes(sizes, lam, b)
            if lead is not None:
                boxes[perm[lead]] = boxes[lead]  # the pair shares one box, pasted both ways
            if self.correct_lam or self.cutmix_minmax is not None:
                lam = torch.where(use_cut, 1.0 - box_fraction(boxes, sizes), lam)
        return perm, lam, use_cut, boxes, bool(apply.any())

    def _params_checked(self, b: int, sizes):
        perm, lam, use_box, boxes, applied = self._params(b, sizes)
        alone = perm == torch.arange(b)  # the middle of an odd batch under "flip" is its own partner: unmixed
        if bool(alone.any()):
            lam = torch.where(alone, torch.ones_like(lam), lam)
            use_box = use_box & ~alone
        return perm, lam, use_box, boxes, applied

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, attention_mask: torch.Tensor | None = None):
        """Mix a batch. ``attention_mask`` ``[B, T]`` (sequences; needs ``return_info=True``) is mixed too and
        returned in the record."""
        check_float_tensor("x", x)
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one sample, got shape {tuple(x.shape)}")
        if attention_mask is not None:
            if not self.return_info:
                raise ValueError("the mixed attention_mask is returned in the MixRecord: build the mixer with "
                                 "return_info=True")
            if attention_mask.shape != x.shape[:2]:
                raise ValueError(f"attention_mask must be [B, T] = {tuple(x.shape[:2])} for x of shape "
                                 f"{tuple(x.shape)}, got {tuple(attention_mask.shape)}")
        y_soft = self._labels(y, x)
        b = x.shape[0]
        dims = normalize_dims(x, self.dims)
        sizes = tuple(x.shape[d] for d in dims)
        if self.enabled:
            perm, lam, use_box, boxes, applied = self._params_checked(b, sizes)
        else:
            perm, lam, use_box, boxes, applied = (torch.arange(b), torch.ones(b), torch.zeros(b, dtype=torch.bool),
                                                  None, False)
        if not applied:
            x_mixed = x
        elif self.mode == "batch":
            x_mixed = mix_boxes(x, perm, boxes, dims=dims) if boxes is not None else mix(x, lam, perm)
        else:
            x_mixed = mix_per_sample(x, perm, lam, boxes, use_box, dims=dims)
        label_lam = lam
        if self.label_lam_fn is not None and applied:  # rows left unmixed (lam = 1) keep their own label
            label_lam = torch.where(lam < 1, torch.as_tensor(self.label_lam_fn(lam.clone()), dtype=lam.dtype), lam)
        y_mixed = mix_targets(y_soft, label_lam, perm) if applied else y_soft
        record = MixRecord(lam=lam, perm=perm, label_lam=torch.as_tensor(label_lam), use_box=use_box, boxes=boxes,
                           targets=y_soft, dims=dims, sizes=sizes, applied=applied)
        if attention_mask is not None:  # returned in the mask's own dtype
            record.attention_mask = record.apply(attention_mask.bool()).to(attention_mask.dtype) if applied \
                else attention_mask
        if self.return_info:
            return x_mixed, y_mixed, record
        return x_mixed, y_mixed

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"cutmix_minmax={self.cutmix_minmax}, prob={self.prob}, switch_prob={self.switch_prob}, "
                f"mode={self.mode!r}, correct_lam={self.correct_lam}, label_smoothing={self.label_smoothing}, "
                f"num_classes={self.num_classes}, pairing={self.pairing!r})")


class MixUp(MixUpCutMix):
    """Mixup only (Zhang et al., ICLR 2018): ``x_i' = lam x_i + (1 - lam) x_perm(i)``, same for labels.

    Args:
        alpha: Beta concentration, > 0. Defaults to 1.0. Other keywords as :class:`MixUpCutMix`.
    """

    def __init__(self, alpha: float = 1.0, *, prob: float = 1.0, mode: str = "batch", label_smoothing: float = 0.0,
                 num_classes: int | None = None, **kwargs) -> None:
        check_alpha("alpha", alpha)
        super().__init__(mixup_alpha=alpha, cutmix_alpha=0.0, prob=prob, mode=mode, label_smoothing=label_smoothing,
                         num_classes=num_classes, **kwargs)


class CutMix(MixUpCutMix):
    """CutMix only (Yun et al., ICCV 2019): paste a box of the partner covering ``1 - lam`` of the sample.

    Args:
        alpha: Beta concentration, > 0. Defaults to 1.0.
        minmax: optional ``(min, max)`` box side ratios instead of lam-sized square boxes.
        Other keywords as :class:`MixUpCutMix`.
    """

    def __init__(self, alpha: float = 1.0, *, minmax: Sequence[float] | None = None, prob: float = 1.0,
                 mode: str = "batch", correct_lam: bool = True, label_smoothing: float = 0.0,
                 num_classes: int | None = None, **kwargs) -> None:
        check_alpha("alpha", alpha)
        super().__init__(mixup_alpha=0.0, cutmix_alpha=alpha, cutmix_minmax=minmax, prob=prob, mode=mode,
                         correct_lam=correct_lam, label_smoothing=label_smoothing, num_classes=num_classes, **kwargs)
