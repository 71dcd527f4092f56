"""Recycled CPU buffers: the stacked expert weight gradients, the fused loop's saved activations and the
expert buffer layouts' GEMM and GLU outputs and input gradients.

The gradient of a stacked expert weight ``[E, D, H]`` is large (E times a dense layer's), and so are the
activations the fused expert loop keeps for the backward and the ``[R, H]`` rows of the expert buffer. Allocated fresh every step, such buffers are
above glibc's mmap threshold or trimmed off the heap when freed, so every step maps new pages that fault
in and are zeroed on first touch: tens of milliseconds per step at ``E=64, D=512, H=256`` on two cores.
:class:`RecycledBuffer` keeps the storage of the last buffer it handed out and hands it out again only
once nothing else refers to it: for a gradient, ``zero_grad(set_to_none=True)`` dropped ``.grad`` or
autograd summed it into an existing ``.grad``; for saved activations, the backward let them go. While
anything still holds it (``.grad``, a tensor returned by ``torch.autograd.grad``, a view, a forward
whose backward has not run yet) a fresh buffer is allocated and kept instead, so no tensor anyone can
see is ever overwritten.

Only CPU tensors are recycled; the CUDA caching allocator already reuses freed blocks.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch

__all__ = ["RecycledBuffer", "OpBuffers", "take_or_empty", "take_rows"]

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class RecycledBuffer:
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
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if torch.device(device).type != "cpu" or _storage_use_count is None:
            self._storage = None
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            storage = self._storage
            if storage is None or storage.nbytes() < nbytes or _storage_use_count(storage._cdata) != 1:
                storage = torch.empty(int(nbytes * headroom), dtype=torch.uint8).untyped_storage()
                self._storage = storage
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class OpBuffers:
    """The recycled buffers of one op on the expert buffer rows: ``out`` (its output), ``grad_in`` (its
    input's gradient) and ``work`` (a tensor it keeps for the backward or works in, e.g. the GLU's
    ``act(gate)``). Not copied by ``copy``/``pickle`` (a copy starts empty)."""

    ROLES = ("out", "grad_in", "work")

    def __init__(self) -> None:
        self.out = RecycledBuffer()
        self.grad_in = RecycledBuffer()
        self.work = RecycledBuffer()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


# Sizes of the expert buffer change with the routing from step to step: a new buffer leaves room.
ROWS_HEADROOM = 1.125


def take_or_empty(buffer: Optional[RecycledBuffer], like: torch.Tensor, shape=None,
                  headroom: float = 1.0) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` (default ``like``'s shape) with ``like``'s dtype and
    device: from ``buffer`` (:meth:`RecycledBuffer.take_shape`), or fresh when there is no buffer."""
    shape = like.shape if shape is None else shape
    if buffer is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return buffer.take_shape(shape, like.dtype, like.device, headroom)


def take_rows(buffers: Optional[OpBuffers], role: str, like: torch.Tensor, shape=None) -> torch.Tensor:
    """Uninitialised tensor for expert-buffer rows from ``buffers.<role>`` (one of :attr:`OpBuffers.ROLES`),
    with room for the sizes to grow a little from step to step; fresh when ``buffers`` is None."""
    return take_or_empty(getattr(buffers, role) if buffers is not None else None, like, shape, ROWS_HEADROOM)
