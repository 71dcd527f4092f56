"""Keep freed CPU memory in the process heap instead of returning it to the kernel.

glibc's malloc serves every request above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so a training step that allocates the same large activation and gradient
buffers every iteration page-faults (and zero-fills) all of them again, every step. MoE layers with
stacked expert weights allocate gradients of ``E * D * H`` elements per step, so small batches spend a
large share of their time in page faults (``docs/results/moe_layer.md`` compares both settings). Raising the thresholds lets freed buffers be reused.

This changes a process-wide allocator setting, so moemix never does it on import; call it once at the
start of a CPU training script (or set the environment variables ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` before Python starts). Using jemalloc or tcmalloc through ``LD_PRELOAD``
has a similar effect.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import warnings

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(max_bytes: int = 1 << 30) -> bool:
    """Let glibc serve allocations up to ``max_bytes`` from its reusable heap.

    Args:
        max_bytes: largest allocation kept in the heap (the mmap threshold); freed memory up to twice
            that stays mapped (the trim threshold). Defaults to 1 GiB. Older glibc releases refuse values
            above their heap limit; the return value tells.

    Returns:
        True if the setting was applied (Linux with glibc), False otherwise (with a warning).
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not sys.platform.startswith("linux"):
        warnings.warn("reuse_freed_memory: only glibc on Linux is supported; nothing changed", stacklevel=2)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        warnings.warn("reuse_freed_memory: glibc mallopt not found; nothing changed", stacklevel=2)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = min(max_bytes, 2**31 - 1)
    ok = mallopt(_M_MMAP_THRESHOLD, limit) == 1 and mallopt(_M_TRIM_THRESHOLD, min(2 * limit, 2**31 - 1)) == 1
    if not ok:
        warnings.warn("reuse_freed_memory: mallopt refused the setting; nothing changed", stacklevel=2)
    return ok
