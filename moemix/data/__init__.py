"""Lightning DataModules and embedded default datasets."""
from moemix.data.images import ImageDataModule, load_digits_tensors

__all__ = ["ImageDataModule", "load_digits_tensors"]
