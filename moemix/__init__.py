"""moemix: Mixture-of-Experts layers and mixing augmentations for PyTorch."""
__version__ = "0.1.0"
