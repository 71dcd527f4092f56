"""The "auto" layout rule: shapes, device and dtype only."""
import pytest
import torch

from moemix.layers import GroupedExperts, MoELayer, SparseMoE, TopKRouter, choose_layout
from moemix.layers.grouped_gemm import grouped_mm_supported


def test_auto_rule_cpu():
    assert choose_layout([16] * 64) == "padded"           # few rows per expert, balanced
    assert choose_layout([512] * 64) == "sorted"          # many rows per expert
    assert choose_layout([100, 1, 1, 1]) == "sorted"      # few rows, but padding would more than double them
    assert choose_layout([16] * 64, num_dropped=3) == "sorted"
    assert choose_layout([0, 0]) == "sorted"


def test_auto_rule_cuda():
    assert choose_layout([512] * 64, device_type="cuda") == "padded"
    assert choose_layout([1000, 1, 1, 1, 1, 1, 1, 1], device_type="cuda") == "sorted"
    assert choose_layout([16] * 4, num_dropped=1, device_type="cuda") == "sorted"
    assert choose_layout([512] * 64, device_type="cuda", grouped_mm_ok=True) == "grouped_mm"
    assert choose_layout([1000, 1, 1, 1], device_type="cuda", grouped_mm_ok=True) == "grouped_mm"  # no padding
    assert choose_layout([16] * 4, num_dropped=1, device_type="cuda", grouped_mm_ok=True) == "sorted"


def test_grouped_mm_only_on_cuda_in_half_precision_with_aligned_widths():
    widths = (512, 2048, 1024, 512)
    assert grouped_mm_supported("cuda", torch.bfloat16, widths)
    assert grouped_mm_supported("cuda", torch.float16, widths)
    assert not grouped_mm_supported("cuda", torch.float32, widths)
    assert not grouped_mm_supported("cpu", torch.bfloat16, widths)
    assert not grouped_mm_supported("cuda", torch.bfloat16, (512, 2044, 1022, 512))  # rows not 16-byte aligned


def test_experts_are_asked_in_the_autocast_dtype(monkeypatch):
    asked = []
    experts = GroupedExperts(4, 16, 32, glu=True)
    monkeypatch.setattr(experts, "grouped_mm_ok", lambda device, dtype: asked.append((device, dtype)) or False)
    layer = MoELayer(TopKRouter(16, 4, 2), experts)
    x = torch.randn(3, 16)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert asked == [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    monkeypatch.undo()
    assert not experts.grouped_mm_ok("cpu", torch.bfloat16)  # the rule itself: CUDA only


@pytest.mark.parametrize("tokens, want", [(4, "padded"), (4096, "sorted")])
def test_sparse_moe_takes_the_rule(tokens, want):
    torch.manual_seed(0)
    moe = SparseMoE(16, 32, num_experts=2, k=1)
    with torch.no_grad():
        moe.router.weight.zero_()  # equal logits: topk picks expert 0 ... so route half the tokens each way
        moe.router.weight[0, 0], moe.router.weight[1, 0] = 1.0, -1.0
    x = torch.randn(tokens, 16)
    plan = moe.experts.plan_routing(x, moe.router(x))
    assert plan.layout == want
