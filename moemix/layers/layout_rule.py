"""The ``"auto"`` dispatch rule: which strategy of :mod:`moemix.layers.dispatch` runs the experts, per call.

The thresholds are measured, not tuned: ``benchmarks/moe_layer.py --layouts ...`` and
``benchmarks/dispatch_rule.py`` on 2 CPU cores, the CUDA runs of ``benchmarks/cuda_suite.sh``; the comments
below say which table each comes from.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from moemix.layers._validate import check_choice
from moemix.layers.grouped_gemm import grouped_mm_alignment

__all__ = ["choose_layout", "grouped_mm_pays_off"]

# "auto" rule, from benchmarks/moe_layer.py --layouts loop,sorted,padded and benchmarks/dispatch_rule.py
# (a sweep of expert sizes and rows per expert) on 2 CPU cores: the fused per-expert loop wins when an expert
# has many rows or enough work for its per-call overhead not to matter; below that the padded batched GEMM
# wins while padding stays small, and under skew the loop (its chunks share the per-expert ops) beat the
# sorted slices in 23 of 25 cases (sorted / loop up to 1.29; the sorted slices were ahead by about 1% in the
# other two). Where "small enough" ends depends on the fused loop's GEMM library (moemix.layers.cpu_gemm), the
# padded layout's being torch.bmm (BLAS) everywhere:
# - every loop product in oneDNN ("onednn_all"; AMD Zen 5, AVX-512; docs/results/dispatch_rule_zen5.md): the loop
#   ahead or level in all 23 balanced cases from 8.4M mean rows x first-layer multiply-adds per row (padded /
#   loop 1.00-1.13 at 8.4M, 1.22-1.36 at 16.8M, 1.32-1.85 above), the padded layout ahead at 4.2M (0.96-0.97);
#   a second sweep with the 6e6 threshold (dispatch_rule_zen5_run2.md) had the padded layout ahead at one
#   balanced 8.4M case (16 experts of width 512, 16 rows: 0.84), the loop at the other 22 (1.01-1.95), and
#   the padded layout ahead at 4.2M again (0.89-0.90);
# - the layers' products and input gradients in oneDNN, the weight gradients in BLAS ("onednn"; AMD Zen 4,
#   AVX-512; docs/results/dispatch_rule.md): 17M was a toss-up, from 34M the loop won or tied;
# - loop in BLAS, like the padded layout ("blas"; AMD Zen 3, AVX2; docs/results/dispatch_rule_avx2.md): the padded
#   layout was ahead or level in all 8 balanced cases of 34-67M (padded / loop 0.86-1.00) and level or
#   behind from 134M (1.00-1.21). Measured in float32 only: autocast bf16/fp16 and float64 (the loop in
#   torch.mm there too) take the BLAS threshold unmeasured.
PADDED_MAX_MEAN_ROWS = 128
LOOP_MIN_EXPERT_MACS = {"onednn_all": 6e6, "onednn": 2e7, "blas": 1e8}
PADDED_MAX_WASTE = 1.5
# On CUDA (H200, torch 2.11, benchmarks/cuda_suite.sh: --quick runs in float32 and bfloat16, CUDA tables of
# docs/results/moe_layer.md) the batched GEMM beat the sorted slices at every configuration, skewed routing
# included (up to 4x padding), except `coarse_skewed` (1024 rows per expert) in float32, where the sorted slices
# took 6.07 ms against its 6.85 (bfloat16: 5.17 against 4.81; an earlier float32 run, `git show
# e561b56:docs/results/moe_layer.md`, had 5.33 against 6.20); beyond that padding the sorted slices bound the memory.
PADDED_MAX_WASTE_CUDA = 4.0
# On CUDA in bfloat16 (H200, torch 2.11, --quick run with --layouts loop,sorted,padded,grouped_mm, the
# "CUDA, bfloat16, run 2" table of docs/results/moe_layer.md) the grouped_mm layout beat the padded one at 7 of 8
# configurations (padded / grouped_mm 1.01-1.30, median of per-round ratios) and tied at small_coarse_skewed
# (0.99); in float32, where F.grouped_mm takes a slow path, the padded layout took 0.37-0.83 of its time except at
# coarse_skewed. float16 has not been measured, so it keeps the padded/sorted rule.
GROUPED_MM_AUTO_DTYPES = (torch.bfloat16,)


def choose_layout(counts: List[int], num_dropped: int = 0, device_type: str = "cpu",
                  macs_per_row: Optional[int] = None, grouped_mm_ok: bool = False, loop_gemm: str = "onednn") -> str:
    """The strategy ``"auto"`` takes for these per-expert counts (rules measured by benchmarks/moe_layer.py
    and benchmarks/dispatch_rule.py). ``macs_per_row``: multiply-adds of one row through an expert's first
    layer (``in_features * H'``); None leaves the expert size out of the CPU rule. ``grouped_mm_ok``: the
    experts can run in ``F.grouped_mm`` and gain by it (:func:`grouped_mm_pays_off`). ``loop_gemm``: the
    library the fused loop's CPU products would run in (:func:`moemix.layers.cpu_gemm.cpu_gemm`): ``"onednn_all"``
    (every product in oneDNN), ``"onednn"`` (the weight gradients in BLAS) or ``"blas"``; it moves the expert
    size up to which the padded layout wins."""
    check_choice("loop_gemm", loop_gemm, tuple(LOOP_MIN_EXPERT_MACS))
    routed = sum(counts)
    hit = sum(1 for c in counts if c)
    padded_rows = len(counts) * max(counts, default=0)
    if device_type == "cuda":
        if grouped_mm_ok and not num_dropped:
            return "grouped_mm"
        if num_dropped or routed == 0 or padded_rows > PADDED_MAX_WASTE_CUDA * routed:
            return "sorted"
        return "padded"
    if num_dropped or routed == 0:
        return "loop"
    mean_rows = routed / hit
    small_experts = mean_rows <= PADDED_MAX_MEAN_ROWS and (
        macs_per_row is None or mean_rows * macs_per_row < LOOP_MIN_EXPERT_MACS[loop_gemm])
    return "padded" if small_experts and padded_rows <= PADDED_MAX_WASTE * routed else "loop"


def grouped_mm_pays_off(device_type: str, dtype: torch.dtype, widths) -> bool:
    """Whether ``"auto"`` runs experts of these layer ``widths`` (inputs and outputs of both layers) in
    ``F.grouped_mm``: on CUDA, in a dtype where it was measured faster (``GROUPED_MM_AUTO_DTYPES``), with
    16-byte aligned rows, on a torch that has it."""
    if device_type != "cuda" or dtype not in GROUPED_MM_AUTO_DTYPES or not hasattr(F, "grouped_mm"):
        return False
    align = grouped_mm_alignment(dtype)
    return all(w % align == 0 for w in widths)
