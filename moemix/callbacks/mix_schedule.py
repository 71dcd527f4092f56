"""Lightning callback that schedules a mixing transform by epoch: off at epoch N, annealed alpha, AV ratio."""
from __future__ import annotations

from typing import Sequence

from lightning.pytorch.callbacks import Callback

__all__ = ["MixSchedule"]


class MixSchedule(Callback):
    """Schedule ``pl_module.<attr>`` (a moemix mixing transform) at the start of every training epoch.

    - ``off_epoch``: mixing stops from this epoch on (early-stopped mixup, Zou et al., "The Benefits of Mixup
      for Feature Learning", ICML 2023; timm's ``--mixup-off-epoch``).
    - ``alpha``: ``(start, end)`` linearly annealed, ``start`` at epoch 0 and ``end`` from epoch ``anneal_epochs``
      on, and written to each attribute in ``alpha_attrs`` that is > 0; a value <= 0 switches mixing off
      instead.
    - transforms with ``set_progress`` (``AVMix``: the audio share) get ``min(1, epoch / anneal_epochs)``.

    Switching off sets the transform's ``enabled`` (``MixUpCutMix``, ``TransMix``, ``PatchMix``,
    ``BeatSyncMixup``, ``ClasswiseMixup``); a transform without one raises a ``ValueError`` when the schedule
    could switch it off.

    Args:
        attr: name of the transform on the LightningModule. Defaults to ``"mixer"``.
        off_epoch: first epoch without mixing. Defaults to None (never off).
        alpha: ``(start, end)`` Beta concentration schedule. Defaults to None (unchanged).
        alpha_attrs: which alphas to anneal. Defaults to ``("mixup_alpha", "cutmix_alpha")``.
        anneal_epochs: epochs from the start value to the end value. Defaults to the trainer's ``max_epochs - 1``,
            so the last epoch runs at the end value; required when the trainer has no ``max_epochs``
            (step-based training) and the schedule anneals.
    """

    def __init__(self, *, attr: str = "mixer", off_epoch: int | None = None,
                 alpha: Sequence[float] | None = None, alpha_attrs: Sequence[str] = ("mixup_alpha", "cutmix_alpha"),
                 anneal_epochs: int | None = None) -> None:
        if off_epoch is not None and off_epoch < 0:
            raise ValueError(f"off_epoch must be >= 0, got {off_epoch!r}")
        if alpha is not None and len(alpha) != 2:
            raise ValueError(f"alpha must be (start, end), got {alpha!r}")
        if anneal_epochs is not None and anneal_epochs < 1:
            raise ValueError(f"anneal_epochs must be >= 1, got {anneal_epochs!r}")
        self.attr, self.off_epoch, self.alpha = attr, off_epoch, tuple(alpha) if alpha is not None else None
        self.alpha_attrs, self.anneal_epochs = tuple(alpha_attrs), anneal_epochs

    def _progress(self, trainer, anneals: bool) -> float:
        total = self.anneal_epochs
        if total is None:
            max_epochs = trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                if anneals:
                    raise ValueError("MixSchedule: the trainer has no max_epochs (step-based training); pass "
                                     "anneal_epochs for the alpha schedule or set_progress")
                return 0.0
            total = max(1, max_epochs - 1)
        return min(1.0, trainer.current_epoch / total)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        mixer = getattr(pl_module, self.attr, None)
        if mixer is None:
            raise ValueError(f"MixSchedule: the LightningModule has no mixing transform at attribute {self.attr!r}")
        switches = self.off_epoch is not None or (self.alpha is not None and min(self.alpha) <= 0)
        if switches and not hasattr(mixer, "enabled"):
            raise ValueError(f"MixSchedule: {type(mixer).__name__} has no `enabled` switch, so off_epoch (or an "
                             "alpha schedule reaching 0) cannot turn it off")
        epoch = trainer.current_epoch
        progress = self._progress(trainer, self.alpha is not None or hasattr(mixer, "set_progress"))
        enabled = True
        if self.off_epoch is not None and epoch >= self.off_epoch:
            enabled = False
        own_off = getattr(mixer, "off_epoch", None)  # MixUpCutMix's own early stop stays in force
        if own_off is not None and epoch >= own_off:
            enabled = False
        if self.alpha is not None:
            value = self.alpha[0] + (self.alpha[1] - self.alpha[0]) * progress
            if value <= 0:
                enabled = False
            else:
                for name in self.alpha_attrs:
                    if getattr(mixer, name, 0) > 0:
                        setattr(mixer, name, float(value))
        if hasattr(mixer, "enabled"):
            mixer.enabled = enabled
        if hasattr(mixer, "set_progress"):
            mixer.set_progress(progress)
