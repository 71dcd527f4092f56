"""Run independent groups of experts concurrently on CPU worker threads.

On CPU, single-threaded GEMMs side by side get more done than one GEMM at a time split over all
threads when every expert has a few hundred rows or more, and while one thread runs an op the other
runs Python. The fused expert loop (:mod:`moemix.layers.expert_loop`) therefore splits its experts into
groups of about equal rows and runs each group on its own worker thread with one intra-op thread,
when :func:`expert_worker_count` says so (rule measured by ``benchmarks/moe_layer.py``).

The workers are a process-wide pool, created on first use with ``torch.get_num_threads()`` threads.
Each worker sets its own intra-op thread count to 1; the process-wide count that
``torch.set_num_threads`` keeps for threads started later is restored right after, and the pool checks
that this worked (it needs torch's OpenMP backend; with any other backend the loop runs serially).
:func:`set_expert_workers` turns the workers off (or on again) for the whole process.
"""
from __future__ import annotations

import heapq
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, TypeVar

import torch

__all__ = ["expert_groups", "expert_worker_count", "run_expert_groups", "set_expert_workers",
           "expert_workers_enabled", "WORKERS_MIN_MEAN_ROWS"]

R = TypeVar("R")

# Rule measured on 2 CPU cores (benchmarks/moe_layer.py --layouts loop,loop_serial and shapes between its
# configurations): with 256 or more rows per expert the workers won at every shape measured (3% at
# `coarse`, 7% at `fine`, 4% with 256 rows of `coarse` experts); at 128 rows they lost for `coarse`
# experts (6%) and won for `fine` ones; at 32 rows (`small_coarse`) one thread per GEMM lost by 30%.
WORKERS_MIN_MEAN_ROWS = 256

_enabled = True
_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)  # (threads, pid) the pool was made for


def set_expert_workers(enabled: bool) -> None:
    """Allow (default) or forbid the fused expert loop to use CPU worker threads, process-wide."""
    global _enabled
    _enabled = bool(enabled)


def expert_workers_enabled() -> bool:
    """Whether :func:`set_expert_workers` allows worker threads."""
    return _enabled


def expert_groups(counts: Sequence[int], num_groups: int) -> List[List[int]]:
    """Split the hit experts into at most ``num_groups`` groups of about equal rows.

    Largest expert first onto the least-loaded group (LPT scheduling); each group lists its experts in
    ascending order. Empty groups are left out. Depends only on ``counts``, so it is deterministic.
    """
    hit = sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e))
    heap = [(0, g) for g in range(min(num_groups, len(hit)))]
    groups: List[List[int]] = [[] for _ in heap]
    for e in hit:
        load, g = heapq.heappop(heap)
        groups[g].append(e)
        heapq.heappush(heap, (load + counts[e], g))
    return [sorted(g) for g in groups]


def expert_worker_count(device: torch.device, counts: Sequence[int]) -> int:
    """How many worker threads the fused loop should use for these per-expert counts (1 = run serially)."""
    if not _enabled or device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    hit = sum(1 for c in counts if c)
    if threads < 2 or hit < 2 or sum(counts) / hit < WORKERS_MIN_MEAN_ROWS:
        return 1
    return min(threads, hit) if _workers(threads) is not None else 1


def run_expert_groups(fn: Callable[[List[int]], R], groups: List[List[int]]) -> List[R]:
    """``[fn(g) for g in groups]``, each group on its own worker thread (inline when only one).

    ``fn`` runs with gradient recording off, as in an autograd function's forward and backward.
    """
    if len(groups) <= 1:
        return [fn(g) for g in groups]
    pool = _workers(torch.get_num_threads())
    if pool is None:
        return [fn(g) for g in groups]

    def call(group: List[int]) -> R:
        with torch.no_grad():
            return fn(group)

    return list(pool.map(call, groups))


def _workers(size: int) -> Optional[ThreadPoolExecutor]:
    """The pool of ``size`` single-threaded workers, None if they cannot be set up.

    Created again when the thread count changed or in a forked child (which has no worker threads).
    """
    global _pool, _pool_key
    key = (size, os.getpid())
    with _pool_lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[1] == key[1]:
                _pool.shutdown(wait=True)
            _pool, _pool_key = _start_pool(size), key
        return _pool


def _start_pool(size: int) -> Optional[ThreadPoolExecutor]:
    ready = threading.Barrier(size + 1)
    worker_threads: List[int] = []

    def init() -> None:
        try:
            torch.get_num_threads()  # this thread's lazy intra-op set-up, which reads the process-wide count
            torch.set_num_threads(1)
            worker_threads.append(torch.get_num_threads())
        finally:
            ready.wait()

    pool = ThreadPoolExecutor(size, initializer=init, thread_name_prefix="moemix-expert")
    try:
        for _ in range(size):  # every worker waits in init until all have started, so each submit starts one
            pool.submit(lambda: None)
        ready.wait(timeout=60)
    except threading.BrokenBarrierError:
        worker_threads.clear()
    finally:
        torch.set_num_threads(size)  # restore the count that threads started later begin with
    if len(worker_threads) != size or any(n != 1 for n in worker_threads) or torch.get_num_threads() != size:
        pool.shutdown(wait=False)
        return None
    return pool
