"""Run independent groups of experts side by side on CPU worker threads.

On CPU, single-threaded GEMMs side by side get more done than one mid-sized GEMM at a time spread over
all threads (a few hundred rows per expert, but not GEMMs so large that they keep all threads busy on
their own), and while one thread runs an op another runs Python.
The fused expert loop (:mod:`moemix.layers.expert_loop`) therefore asks :func:`plan_expert_groups` for
groups of experts of about equal rows and runs each group on its own worker thread
(:func:`run_expert_groups`); a single group means the loop runs serially on the calling thread.

The workers are a process-wide pool per intra-op thread count, made on first use:
``min(threads, MAX_WORKERS)`` workers with ``threads // workers`` intra-op threads each. Making it sets
each worker's own thread count, which also changes the count torch hands to threads started later; the
calling thread's count is put back right after, and the pool is checked (workers, and a thread started
afterwards, see the intended counts) or not used. Workers are only used with torch's OpenMP backend and
MKL (the configuration measured), not while the autograd profiler, a Python dispatch mode or a torch
function mode other than a default device (``FlopCounterMode``, ...) is active, as those are per-thread
state the workers would not see (the loop allocates on its inputs' device explicitly), and not
after :func:`set_expert_workers` ``(False)``. Results equal the serial loop's up to the order in which
the groups' partial sums are added, which depends only on the counts and the thread count.
"""
from __future__ import annotations

import heapq
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch

from moemix.layers.cpu_gemm import python_modes_active

__all__ = ["expert_groups", "plan_expert_groups", "workers_pay_off", "run_expert_groups", "set_expert_workers",
           "expert_workers_enabled", "WORKERS_MIN_MEAN_ROWS", "WORKERS_MIN_EXPERTS", "WORKERS_MAX_EXPERT_MACS",
           "WORKERS_MAX_IMBALANCE",
           "MAX_WORKERS"]

R = TypeVar("R")

# Rules measured on 2 CPU cores (benchmarks/moe_layer.py --layouts loop_serial,loop_workers; table in
# docs/results/moe_layer.md, and shapes between its configurations): with 256 or more rows per expert the
# workers won while each expert's first GEMM was mid-sized (`fine`: 512 rows x 512 x 512, serial / workers
# 1.046 and 1.099 with balanced and skewed routing) and gained little or nothing for GEMMs that keep all
# threads busy on their own (`coarse`: 1024 rows x 512 x 2048; serial / workers 0.952 and 1.024 with the
# products in oneDNN; 3-5% slower with them in MKL, `git show 74c70a9:docs/results/moe_layer.md`);
# with 32 rows per expert (`small_coarse`) the workers took 1.25-1.34x the serial time (before the serial
# loop had chunks: `git show fcfaef0:docs/results/moe_layer.md`). Since the serial
# loop runs adjacent experts as one chunk (moemix.layers.expert_loop), few experts lost on workers: with
# 256-1024 rows per expert, 8 experts took 1.10-1.22x and 16 experts 0.97-1.10x the serial time, while
# with 64 the serial loop took 1.02-1.03x the workers' time (benchmarks/dispatch_rule.py --extra
# loop_serial,loop_workers, docs/results/loop_workers.md).
WORKERS_MIN_MEAN_ROWS = 256
WORKERS_MIN_EXPERTS = 32  # hit experts
WORKERS_MAX_EXPERT_MACS = 4e8  # mean rows x in_features x first-layer width, per expert
# A group with much more than its share of rows (one hot expert) would leave the other threads idle
# while its GEMMs run on fewer threads than the serial loop gives them.
WORKERS_MAX_IMBALANCE = 1.25
# Each group adds into its own [T, D] output (and input gradient): bound that memory.
MAX_WORKERS = 8

_enabled = True
_pools_lock = threading.Lock()
_pools: Dict[int, Optional[ThreadPoolExecutor]] = {}  # intra-op thread count -> pool (None: unusable)
_backend_ok: Optional[bool] = None


def set_expert_workers(enabled: bool) -> None:
    """Allow (default) or forbid the fused expert loop's CPU worker threads, process-wide."""
    global _enabled
    _enabled = bool(enabled)


def expert_workers_enabled() -> bool:
    """Whether :func:`set_expert_workers` allows worker threads."""
    return _enabled


def expert_groups(counts: Sequence[int], num_groups: int) -> List[List[int]]:
    """Split the hit experts into at most ``num_groups`` groups of about equal rows.

    Largest expert first onto the least-loaded group (LPT scheduling); each group lists its experts in
    ascending order; experts without rows are left out. Depends only on ``counts`` and ``num_groups``.
    """
    hit = sorted((e for e, c in enumerate(counts) if c), key=lambda e: (-counts[e], e))
    heap = [(0, g) for g in range(min(num_groups, len(hit)))]
    groups: List[List[int]] = [[] for _ in heap]
    for e in hit:
        load, g = heapq.heappop(heap)
        groups[g].append(e)
        heapq.heappush(heap, (load + counts[e], g))
    return [sorted(g) for g in groups]


def plan_expert_groups(device: torch.device, counts: Sequence[int], macs_per_row: int) -> List[List[int]]:
    """The expert groups the fused loop runs side by side; one group (or none) means serially.

    ``macs_per_row``: multiply-adds of one row through an expert's first layer (``in_features * H'``).
    """
    serial = expert_groups(counts, 1)
    threads = torch.get_num_threads()
    hit = sum(1 for c in counts if c)
    routed = sum(counts)
    if not _usable(device) or threads < 2 or hit < 2 or not workers_pay_off(routed / hit, macs_per_row, hit):
        return serial
    groups = expert_groups(counts, min(threads, MAX_WORKERS))
    largest = max(sum(counts[e] for e in g) for g in groups)
    if largest > WORKERS_MAX_IMBALANCE * routed / len(groups) or _workers(threads) is None:
        return serial
    return groups


def workers_pay_off(mean_rows: float, macs_per_row: int, hit_experts: int) -> bool:
    """The size rules: enough experts with rows and enough rows per expert, and an expert's first GEMM not
    so large that it keeps all threads busy on its own (``macs_per_row = in_features * H'``)."""
    return (WORKERS_MIN_EXPERTS <= hit_experts and WORKERS_MIN_MEAN_ROWS <= mean_rows
            and mean_rows * macs_per_row <= WORKERS_MAX_EXPERT_MACS)


def run_expert_groups(fn: Callable[[List[int]], R], groups: List[List[int]]) -> List[R]:
    """``[fn(g) for g in groups]``, the groups side by side on worker threads (inline for one group, or
    when workers are not usable now). ``fn`` runs with gradient recording off, as in an autograd
    function. Every group finishes before an exception of one of them is raised."""
    if len(groups) <= 1 or not _usable(torch.device("cpu")):
        return [fn(g) for g in groups]
    pool = _workers(torch.get_num_threads())
    if pool is None:
        return [fn(g) for g in groups]

    def call(group: List[int]) -> R:
        with torch.no_grad():
            return fn(group)

    futures = [pool.submit(call, g) for g in groups]
    wait(futures)
    return [f.result() for f in futures]


def _usable(device: torch.device) -> bool:
    return _enabled and device.type == "cpu" and _backend_supported() and not _thread_state_active()


def _backend_supported() -> bool:
    global _backend_ok
    if _backend_ok is None:
        _backend_ok = torch.backends.mkl.is_available() and "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _backend_ok


def _thread_state_active() -> bool:
    """The autograd profiler or a Python dispatch / function mode is on: per-thread state workers lack."""
    return torch.autograd.profiler._is_profiler_enabled or python_modes_active()


def _workers(threads: int) -> Optional[ThreadPoolExecutor]:
    """The pool for ``threads`` intra-op threads; None if it cannot be set up. Pools are never shut
    down (another caller may be using one); a forked child starts without any."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = _start_pool(threads)
        return _pools[threads]


def _forget_pools_in_child() -> None:
    global _pools_lock
    _pools_lock = threading.Lock()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def _noop() -> None:
    pass


def _count_in_new_thread() -> int:
    seen: List[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0] if seen else -1


def _start_pool(threads: int) -> Optional[ThreadPoolExecutor]:
    size = min(threads, MAX_WORKERS)
    per_worker = threads // size
    ready = threading.Barrier(size + 1, timeout=60)
    worker_counts: List[int] = []

    def init() -> None:
        try:
            torch.get_num_threads()  # this thread's lazy intra-op set-up, which reads the process-wide count
            torch.set_num_threads(per_worker)
            worker_counts.append(torch.get_num_threads())
        finally:
            ready.wait()

    pool = ThreadPoolExecutor(size, initializer=init, thread_name_prefix="moemix-expert")
    started = False
    try:
        for _ in range(size):  # every worker waits in init until all have started, so each submit starts one
            pool.submit(_noop)
        ready.wait()
        started = True
    except threading.BrokenBarrierError:
        pass
    except BaseException:
        ready.abort()
        pool.shutdown(wait=False)
        raise
    finally:
        torch.set_num_threads(threads)  # this thread's count, and the one threads started later begin with
    if not (started and worker_counts == [per_worker] * size and _count_in_new_thread() == threads):
        ready.abort()
        pool.shutdown(wait=False)
        return None
    return pool
