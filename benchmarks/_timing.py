"""Reusable timing and memory helpers for the moemix benchmarks.

* :func:`interleaved_medians` times several step functions round-robin (one call of each per round,
  the order rotated every round so no variant always runs first or last) and returns per-variant
  medians in milliseconds, with every round's time and the median count of minor page faults per call
  (fresh memory touched for the first time: on CPU a sign that freed buffers went back to the system
  and the call paid to map and zero new pages); :func:`paired_ratio` is the median over rounds of
  the ratio of two variants' times.
* :func:`rss_bytes` / :func:`max_rss_bytes` read the current and peak resident set size of this
  process, used by the per-variant memory subprocess on CPU.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["sync", "time_call", "minor_faults", "interleaved_medians", "paired_ratio", "rss_bytes", "max_rss_bytes",
           "reset_peak_rss"]


def sync(device: torch.device | str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], None], device: torch.device | str) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_medians(fns: Dict[str, Callable[[], None]], device: torch.device | str, *, repeats: int,
                        warmup: int = 1, budget_s: Optional[float] = None) -> Dict[str, dict]:
    """Time ``fns`` round-robin; returns ``{name: {"ms": median, "min_ms", "max_ms", "n", "samples_ms",
    "minor_faults"}}`` (``minor_faults``: median per call, see the module doc).

    ``warmup`` untimed rounds run first. ``budget_s`` (optional) stops after the round in which the
    timed rounds used that many seconds, but never before 3 timed rounds.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    faults: Dict[str, List[int]] = {name: [] for name in names}
    spent = 0.0
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            before = minor_faults()
            dt = time_call(fns[name], device)
            faults[name].append(minor_faults() - before)
            samples[name].append(dt)
            spent += dt
        if budget_s is not None and r >= 2 and spent > budget_s:
            break
    return {name: {"ms": 1e3 * statistics.median(s), "min_ms": 1e3 * min(s), "max_ms": 1e3 * max(s), "n": len(s),
                   "samples_ms": [1e3 * t for t in s], "minor_faults": statistics.median(faults[name])}
            for name, s in samples.items()}


def paired_ratio(numerator: Dict[str, object], denominator: Dict[str, object]) -> float:
    """Median over rounds of ``numerator / denominator`` time, from two :func:`interleaved_medians` entries.

    Both variants ran in the same rounds, next to each other, so a slow spell of a shared machine hits
    both sides of each round's ratio; the median of these paired ratios is steadier than a ratio of medians.
    """
    pairs = zip(numerator["samples_ms"], denominator["samples_ms"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def max_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
