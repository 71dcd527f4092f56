"""Recycled gradient buffers for stacked expert weights (CPU).

The gradient of a stacked expert weight ``[E, D, H]`` is large (E times a dense layer's): allocated
fresh in every backward, it is above glibc's mmap threshold (32 MiB), so every step maps new pages
that fault in and are zeroed on first touch, tens of milliseconds per step for ``E=64, D=512, H=256``
on two cores. :class:`GradBuffer` keeps the storage of the last buffer it handed out and hands it out
again only once nothing else refers to it: ``zero_grad(set_to_none=True)`` dropped ``.grad``, or
autograd summed the gradient into an existing ``.grad`` and let it go. While anything still holds
it (``.grad``, a tensor returned by ``torch.autograd.grad``, a view of either) a fresh buffer is
allocated and kept instead, so no tensor anyone can see is ever overwritten.

Only CPU tensors are recycled; the CUDA caching allocator already reuses freed blocks.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

__all__ = ["GradBuffer"]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class GradBuffer:
    """One recyclable gradient buffer. Not copied by ``copy``/``pickle`` (a copy starts empty)."""

    def __init__(self) -> None:
        self._storage: Optional[torch.UntypedStorage] = None
        self._lock = threading.Lock()  # two backward threads must not both claim the free buffer

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor with ``like``'s shape, dtype and device."""
        if like.device.type != "cpu" or _storage_use_count is None:
            self._storage = None
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        with self._lock:
            storage = self._storage
            if storage is not None and storage.nbytes() == like.nbytes and _storage_use_count(storage._cdata) == 1:
                return torch.empty(0, dtype=like.dtype).set_(storage, 0, like.shape)
            buf = torch.empty(like.shape, dtype=like.dtype)
            self._storage = buf.untyped_storage()
            return buf

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
