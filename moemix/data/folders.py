"""Image datasets a user already has on disk: an ImageFolder tree or CIFAR-10 python batches.

Errors name ``data.root`` and the folder or file at fault, as :class:`~moemix._checks.ConfigError`.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from moemix._checks import ConfigError

__all__ = ["CifarBatches", "cifar_dir", "class_folders", "image_folder"]


def cifar_dir(root: str) -> Optional[str]:
    """The folder under ``root`` (itself or ``cifar-10-batches-py``) that holds CIFAR-10 python batches."""
    for candidate in (root, os.path.join(root, "cifar-10-batches-py")):
        if all(os.path.isfile(os.path.join(candidate, name)) for name in ("data_batch_1", "test_batch")):
            return candidate
    return None


class CifarBatches(Dataset):
    """CIFAR-10 python batches (``data_batch_*``, ``test_batch``) read directly, without checksums, so
    any folder in the official layout works (a copy, a subset). Items: ``(transform(HWC uint8), label)``."""

    def __init__(self, folder: str, files: Sequence[str], transform, root: str):
        import numpy as np

        images, labels = [], []
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
                raise ConfigError(f"data.root={root!r}: {path} is not a readable CIFAR-10 python batch "
                                  f"({type(err).__name__}: {err})") from err
            if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
                raise ConfigError(f"data.root={root!r}: {path} is not a CIFAR-10 python batch "
                                  "(a dict with 'data' and 'labels')")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        self.images = np.concatenate(images).transpose(0, 2, 3, 1)  # HWC for the image transforms
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def _subfolders(folder: str) -> List[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def class_folders(root: str, splits: Sequence[str] = ("val", "test")) -> List[str]:
    """The classes of an ImageFolder tree: the class folders of ``root/train``, in sorted order.

    Every other split in ``splits`` that exists may hold a subset of them (the classes it lacks are returned
    by :func:`image_folder` as missing); a class folder that ``train/`` lacks is an error naming it.
    """
    classes = _subfolders(os.path.join(root, "train"))
    if not classes:
        raise ConfigError(f"data.root={root!r}: {os.path.join(root, 'train')} has no class folders "
                          "(expected train/<class>/<image files>)")
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            continue
        unknown = [c for c in _subfolders(folder) if c not in classes]
        if unknown:
            raise ConfigError(f"data.root={root!r}: {os.path.join(folder, unknown[0])} is a class that "
                              f"{os.path.join(root, 'train')} does not have (train has {classes})")
    return classes


def image_folder(root: str, split: str, classes: Sequence[str], transform):
    """``torchvision.datasets.ImageFolder`` of ``root/split`` with the label indices of ``classes`` (the train
    split's), so that a class keeps its index in every split. Returns ``(dataset, missing classes)``;
    a split without any image, or a training class without images, is an error naming the folder."""
    from torchvision.datasets import ImageFolder

    class_to_idx: Dict[str, int] = {c: i for i, c in enumerate(classes)}

    class _TrainClasses(ImageFolder):
        def find_classes(self, directory):
            return list(classes), dict(class_to_idx)

    folder = os.path.join(root, split)
    dataset = _TrainClasses(folder, transform=transform, allow_empty=True)
    present = {label for _, label in dataset.samples}
    missing = [c for c in classes if class_to_idx[c] not in present]
    if not dataset.samples:
        raise ConfigError(f"data.root={root!r}: {folder} holds no image files in its class folders")
    if missing and split == "train":
        raise ConfigError(f"data.root={root!r}: {os.path.join(folder, missing[0])} holds no image files")
    return dataset, missing
