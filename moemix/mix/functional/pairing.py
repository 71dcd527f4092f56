"""Choosing the partner of every sample in a batch.

``perm[i]`` is the index of the sample that is mixed into sample ``i``:
``mixed[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]``.

- ``"flip"``: ``perm[i] = B - 1 - i`` (timm's ``Mixup``). An involution: pairs mix with each other. With an
  odd batch the middle sample is its own partner and stays unmixed (its target is its own label).
- ``"roll"``: ``perm[i] = i - 1`` (torchvision v2 ``MixUp``/``CutMix``). Every sample gets a partner.
- ``"random"``: a uniformly random permutation (the original mixup/CutMix code).
- ``"random_pairs"``: a random involution: samples are shuffled and paired off two by two (odd batch:
  one sample is its own partner). Needed by ``mode="pair"`` with random pairing.
"""
from __future__ import annotations

import torch

from ._checks import check_choice, check_positive_int

__all__ = ["PAIRINGS", "pair_indices", "is_involution"]

PAIRINGS = ("flip", "roll", "random", "random_pairs")


def pair_indices(batch_size: int, how: str = "flip", *, generator: torch.Generator | None = None,
                 device=None) -> torch.Tensor:
    """Partner indices ``perm`` of shape ``[B]`` (int64) for a batch of ``batch_size``.

    Args:
        batch_size: B, >= 1.
        how: one of ``"flip"``, ``"roll"``, ``"random"``, ``"random_pairs"``. Defaults to ``"flip"``.
        generator: source of randomness for the random pairings.
        device: device of the result. Defaults to CPU (or the generator's device).
    """
    check_positive_int("batch_size", batch_size)
    check_choice("pairing", how, PAIRINGS)
    src = generator.device if generator is not None else torch.device("cpu")
    if how == "flip":
        perm = torch.arange(batch_size - 1, -1, -1)
    elif how == "roll":
        perm = torch.arange(batch_size).roll(1)
    elif how == "random":
        perm = torch.randperm(batch_size, generator=generator, device=src)
    else:
        order = torch.randperm(batch_size, generator=generator, device=src)
        perm = torch.arange(batch_size, device=src)
        half = batch_size // 2
        a, b = order[: 2 * half : 2], order[1 : 2 * half : 2]
        perm[a], perm[b] = b, a
    return perm.to(device if device is not None else src)


def is_involution(perm: torch.Tensor) -> bool:
    """True when ``perm[perm[i]] == i`` for all i (each pair mixes with each other)."""
    return bool((perm[perm] == torch.arange(perm.numel(), device=perm.device)).all())
