"""Recycled CPU buffers: the stacked expert weight gradients, the fused loop's saved activations and the
temporaries of the padded and sorted layouts.

The gradient of a stacked expert weight ``[E, D, H]`` is large (E times a dense layer's), and so are the
activations the fused expert loop keeps for the backward and the ``[R, H]`` rows of the expert buffer.
Allocated fresh every step, such buffers are above glibc's mmap threshold or trimmed off the heap when
freed, so every step maps new pages that fault in and are zeroed on first touch: tens of milliseconds
per step at ``E=64, D=512, H=256`` on two cores. :class:`RecycledBuffer` keeps the storage of the last
buffer it handed out and hands it out again only once nothing else refers to it: for a gradient,
``zero_grad(set_to_none=True)`` dropped ``.grad`` or autograd summed it into an existing ``.grad``; for
saved activations, the backward let them go. While anything still holds it (``.grad``, a tensor
returned by ``torch.autograd.grad``, a view, a forward whose backward has not run yet) a fresh buffer is
allocated and kept instead, so no tensor anyone can see is ever overwritten. :class:`RecycledPool` does
the same for the many short-lived temporaries of one step, sharing buffers between tensors that are
not alive at the same time.

Only CPU tensors are recycled; the CUDA caching allocator already reuses freed blocks.
"""
from __future__ import annotations

import math
import threading
from typing import List, Optional, Union

import torch

__all__ = ["RecycledBuffer", "RecycledPool", "take_or_empty"]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _recyclable(device) -> bool:
    """CPU, and a torch that can tell whether anything else refers to a storage."""
    return torch.device(device).type == "cpu" and _storage_use_count is not None


def _is_free(storage: torch.UntypedStorage) -> bool:
    return _storage_use_count(storage._cdata) == 1  # only the buffer itself holds it


def _new_storage(nbytes: int, headroom: float) -> torch.UntypedStorage:
    return torch.empty(int(nbytes * headroom), dtype=torch.uint8).untyped_storage()


def _tensor_on(storage: torch.UntypedStorage, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class _StartsEmptyWhenCopied:
    """``copy``/``pickle`` give an empty instance: recycled memory is never shared or serialised."""

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class RecycledBuffer(_StartsEmptyWhenCopied):
    """One recyclable buffer. Not copied by ``copy``/``pickle`` (a copy starts empty)."""

    def __init__(self) -> None:
        self._storage: Optional[torch.UntypedStorage] = None
        self._lock = threading.Lock()  # two threads must not both claim the free buffer

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor with ``like``'s shape, dtype and device."""
        return self.take_shape(like.shape, like.dtype, like.device)

    def take_shape(self, shape, dtype: torch.dtype, device: torch.device, headroom: float = 1.0) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``; a new buffer gets ``headroom`` times the bytes
        (> 1 for sizes that change from call to call, such as per-step activations)."""
        if not _recyclable(device):
            self._storage = None
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            storage = self._storage
            if storage is None or storage.nbytes() < nbytes or not _is_free(storage):
                storage = self._storage = _new_storage(nbytes, headroom)
            return _tensor_on(storage, shape, dtype)


class RecycledPool(_StartsEmptyWhenCopied):
    """Recyclable buffers for the temporaries of one layer's step (CPU): the expert-buffer rows, GEMM
    outputs and input gradients of the padded and sorted layouts.

    A request gets the smallest free buffer that is large enough, else a new one, which replaces the
    largest free buffer that was too small; so the pool never holds more buffers than the step had alive
    at once, and their sizes grow to the largest the steps asked for. A buffer is free once nothing
    refers to it (the backward let its tensor go, or the caller dropped it). Not copied by
    ``copy``/``pickle`` (a copy starts empty).
    """

    def __init__(self) -> None:
        self._storages: List[torch.UntypedStorage] = []
        self._lock = threading.Lock()

    def take_shape(self, shape, dtype: torch.dtype, device: torch.device, headroom: float = 1.0) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` from a free buffer of the pool (CPU)."""
        if not _recyclable(device):
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            free = [s for s in self._storages if _is_free(s)]
            fitting = [s for s in free if s.nbytes() >= nbytes]
            if fitting:
                storage = min(fitting, key=lambda s: s.nbytes())
            else:
                if free:  # all too small: the largest makes way
                    self._storages.remove(max(free, key=lambda s: s.nbytes()))
                storage = _new_storage(nbytes, headroom)
                self._storages.append(storage)
            return _tensor_on(storage, shape, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return sum(s.nbytes() for s in self._storages)

    def __len__(self) -> int:
        return len(self._storages)


def take_or_empty(buffer: Optional[Union[RecycledBuffer, RecycledPool]], like: torch.Tensor,
                  shape=None) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` (default ``like``'s shape) with ``like``'s dtype and
    device: from ``buffer`` (a :class:`RecycledBuffer` or :class:`RecycledPool`), or fresh when it is None."""
    shape = like.shape if shape is None else shape
    if buffer is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return buffer.take_shape(shape, like.dtype, like.device)
