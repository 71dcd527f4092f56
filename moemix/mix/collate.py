"""Mixing in the DataLoader's collate step (CPU workers), for pipelines that cannot mix on the device."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import default_collate

__all__ = ["MixCollate"]


class MixCollate:
    """``collate_fn`` that stacks samples, then mixes: ``DataLoader(ds, batch_size=64, collate_fn=MixCollate(mixer))``.

    Samples must be ``(x, y, *rest)`` with float ``x`` (convert uint8 images in the dataset transform). Each worker
    uses the mixer's generator as pickled into it: seed per worker in ``worker_init_fn`` when that matters.

    Args:
        mixer: a transform ``(x, y) -> (x_mixed, y_soft[, record])``; the record is dropped.
        collate_fn: how samples are stacked. Defaults to ``torch.utils.data.default_collate``.
    """

    def __init__(self, mixer: Callable, collate_fn: Callable = default_collate) -> None:
        self.mixer = mixer
        self.collate_fn = collate_fn

    def __call__(self, samples):
        x, y, *rest = self.collate_fn(samples)
        out = self.mixer(x, y)
        return (out[0], out[1], *rest)
