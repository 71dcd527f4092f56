import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moemix.layers.experts as experts_module
from moemix.layers import GroupedExperts, SparseMoE
from moemix.layers.cpu_gemm import cpu_gemm, cpu_gemm_setting, onednn_gemm_usable, set_cpu_gemm
from moemix.layers.layout_rule import choose_layout, grouped_mm_pays_off


def test_auto_rule_cpu():
    assert choose_layout([16] * 64) == "padded"           # few rows per expert, balanced
    assert choose_layout([512] * 64) == "loop"            # many rows per expert
    assert choose_layout([100, 1, 1, 1]) == "loop"        # few rows, but padding would more than double them
    assert choose_layout([1000, 300, 200, 100]) == "loop"
    assert choose_layout([16] * 64, num_dropped=3) == "loop"
    assert choose_layout([0, 0]) == "loop"


def test_auto_rule_cuda():
    assert choose_layout([512] * 64, device_type="cuda") == "padded"
    assert choose_layout([1000, 1, 1, 1, 1, 1, 1, 1], device_type="cuda") == "sorted"
    assert choose_layout([16] * 4, num_dropped=1, device_type="cuda") == "sorted"


def test_auto_rule_cuda_bfloat16_takes_grouped_mm():
    """grouped_mm beat the padded layout on an H200 in bfloat16 (docs/results/moe_layer.md), not in float32."""
    assert choose_layout([512] * 64, device_type="cuda", grouped_mm_ok=True) == "grouped_mm"
    assert choose_layout([1000, 1, 1, 1], device_type="cuda", grouped_mm_ok=True) == "grouped_mm"  # no padding
    assert choose_layout([16] * 4, num_dropped=1, device_type="cuda", grouped_mm_ok=True) == "sorted"
    assert choose_layout([16] * 64, grouped_mm_ok=True) == "padded"  # CPU rule unchanged
    widths = (512, 2048, 1024, 512)
    assert grouped_mm_pays_off("cuda", torch.bfloat16, widths)
    assert not grouped_mm_pays_off("cuda", torch.float32, widths)
    assert not grouped_mm_pays_off("cuda", torch.float16, widths)  # not measured
    assert not grouped_mm_pays_off("cpu", torch.bfloat16, widths)
    assert not grouped_mm_pays_off("cuda", torch.bfloat16, (512, 2044, 1022, 512))  # rows not 16-byte aligned


def test_experts_ask_for_grouped_mm_in_the_autocast_dtype(monkeypatch):
    import moemix.layers.experts as experts_module

    asked = []
    monkeypatch.setattr(experts_module, "grouped_mm_pays_off", lambda *args: asked.append(args) or False)
    experts = GroupedExperts(4, 16, 32, glu=True)
    x = torch.randn(3, 16)
    assert not experts.grouped_mm_pays_off(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not experts.grouped_mm_pays_off(x)
    widths = (16, 64, 32, 16)  # both layers' inputs and outputs, the GLU's first layer doubled
    assert asked == [("cpu", torch.float32, widths), ("cpu", torch.bfloat16, widths)]
    monkeypatch.undo()
    assert not experts.grouped_mm_pays_off(x)  # the rule itself: CUDA only


def test_auto_rule_cpu_weighs_expert_size():
    """Few rows per expert still run the loop when each expert's GEMMs are large (benchmarks/dispatch_rule.py)."""
    big, small = 512 * 2048, 512 * 512  # multiply-adds per row through a 512 -> 2048 or 512 -> 512 first layer
    assert choose_layout([32] * 8, macs_per_row=big) == "loop"        # 32 rows x 1M: 34M per expert
    assert choose_layout([16] * 64, macs_per_row=small) == "padded"   # 16 rows x 262k: 4M per expert
    assert choose_layout([100, 1, 1, 1], macs_per_row=small) == "loop"     # skewed: too much padding
    assert choose_layout([100, 1, 1, 1], macs_per_row=big) == "loop"  # 26 rows x 1M on average
    assert choose_layout([32] * 8, macs_per_row=big, device_type="cuda") == "padded"


def test_auto_rule_cpu_expert_size_depends_on_the_loop_gemm_library():
    """With the loop's products in BLAS (as the padded layout's) the padded layout won up to 67M multiply-adds
    per expert (docs/results/dispatch_rule_avx2.md); with the layers and input gradients in oneDNN, the loop from
    34M; with every product in oneDNN, from 8.4M."""
    big = 512 * 2048
    assert choose_layout([32] * 8, macs_per_row=big, loop_gemm="onednn") == "loop"   # 34M
    assert choose_layout([32] * 8, macs_per_row=big, loop_gemm="blas") == "padded"
    assert choose_layout([64] * 8, macs_per_row=big, loop_gemm="blas") == "padded"   # 67M
    assert choose_layout([128] * 8, macs_per_row=big, loop_gemm="blas") == "loop"    # 134M
    assert choose_layout([100, 1, 1, 1], macs_per_row=big, loop_gemm="blas") == "loop"  # padding still bounds it
    # with the weight gradients in oneDNN too (docs/results/dispatch_rule_zen5.md) the loop won from 8.4M
    small = 512 * 512
    assert choose_layout([32] * 64, macs_per_row=small, loop_gemm="onednn_all") == "loop"  # 8.4M
    assert choose_layout([32] * 64, macs_per_row=small, loop_gemm="onednn") == "padded"
    assert choose_layout([16] * 64, macs_per_row=small, loop_gemm="onednn_all") == "padded"  # 4.2M
    with pytest.raises(ValueError, match="loop_gemm"):
        choose_layout([32] * 8, macs_per_row=big, loop_gemm="mkl")


@pytest.mark.parametrize("setting", ["blas", "onednn", "auto"])
def test_sparse_moe_tells_the_rule_its_loop_gemm_library(monkeypatch, setting):
    asked = []
    real = experts_module.plan_dispatch
    monkeypatch.setattr(experts_module, "plan_dispatch", lambda *args: asked.append(args[-1]) or real(*args))
    moe = SparseMoE(16, 32, act_layer="silu", glu=True, num_experts=4, k=2)
    x = torch.randn(6, 16)
    before = cpu_gemm_setting()
    set_cpu_gemm(setting)
    try:
        moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            moe(x)
        with FlopCounterMode(display=False):  # the loop runs torch.mm here, but the layout is a plain run's
            moe(x)
        libraries = (cpu_gemm(x), cpu_gemm(x, product="weight_grad"))
    finally:
        set_cpu_gemm(before)
    expected = {("onednn", "onednn"): "onednn_all", ("onednn", "blas"): "onednn", ("blas", "blas"): "blas"}[libraries]
    assert asked == [expected, "blas", expected]  # the loop runs autocast bfloat16 products in torch.mm
    if setting != "auto":
        assert expected == ("onednn_all" if setting == "onednn" and onednn_gemm_usable(x) else "blas")
