"""Mixing inside Lightning: mix on the device after the batch is transferred, training batches only.

Pattern (what :class:`MixingMixin` does; copy it if you prefer no mixin)::

    class Classifier(MixingMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.mixer = MixUpCutMix(0.8, 1.0, num_classes=10)

        def training_step(self, batch, _):
            x, y_soft = batch                       # already mixed, y_soft is [B, K]
            return torch.sum(-y_soft * self(x).log_softmax(-1), -1).mean()

``on_after_batch_transfer`` runs on the device the model lives on (GPU mixing, no worker cost) and Lightning
calls it for every stage; the mixin mixes only while ``trainer.training`` and leaves validation/test batches
(index labels) alone. A :class:`moemix.callbacks.MixSchedule` turns it off or anneals it by epoch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["MixingMixin"]


class MixingMixin:
    """LightningModule mixin: mixes ``(x, y, *rest)`` training batches with ``self.mixer``.

    Attributes:
        mixer: a transform ``(x, y) -> (x_mixed, y_soft[, record])``; None disables mixing.
        mix_record: the last :class:`MixRecord` when the mixer returns one (TransMix relabelling needs it).
    """

    mixer: Any = None
    mix_record: Any = None

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        trainer = getattr(self, "_trainer", None)
        if self.mixer is None or trainer is None or not trainer.training:
            return batch
        x, y, *rest = batch
        out = self.mixer(x, y)
        self.mix_record = out[2] if len(out) == 3 else None
        return (out[0], out[1], *rest) if isinstance(batch, tuple) else [out[0], out[1], *rest]
