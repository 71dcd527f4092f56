"""Small utilities that are not layers."""
from moemix.utils.allocator import reuse_freed_memory

__all__ = ["reuse_freed_memory"]
