import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moemix.layers import SparseMoE
from moemix.layers import cpu_gemm as gemm
from moemix.layers import expert_loop as loop
from moemix.layers import expert_workers as workers
from moemix.layers.cpu_gemm import cpu_gemm, cpu_gemm_setting, matmul, onednn_gemm_usable, set_cpu_gemm
from moemix.layers.expert_workers import plan_expert_groups
from tests.layers._reference import reference_moe

ONEDNN = onednn_gemm_usable(torch.empty(1))
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN's fp32 linear")
LIBRARIES = ["blas", pytest.param("onednn", marks=needs_onednn)]


@pytest.fixture(autouse=True)
def restore_setting():
    before = cpu_gemm_setting()
    yield
    set_cpu_gemm(before)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_equals_torch_mm_for_strided_operands_bias_and_out(library, with_bias):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 24, generator=g)
    b_t = torch.randn(40, 24, generator=g)  # b = b_t.t(): a column-major [24, 40] operand
    bias = torch.randn(40, generator=g) if with_bias else None
    expected = a.double() @ b_t.double().t() + (bias.double() if with_bias else 0)
    torch.testing.assert_close(matmul(a, b_t.t(), bias, library=library).double(), expected, rtol=1e-5, atol=1e-5)
    out = torch.full((37, 40), float("nan"))
    result = matmul(a, b_t.t(), bias, out=out, library=library)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul(a, b_t.t().contiguous(), library=library).double(), expected - (
        bias.double() if with_bias else 0), rtol=1e-5, atol=1e-5)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the products oneDNN runs (the op ``matmul`` calls), without changing them."""
    calls = []
    op = gemm._onednn_linear()
    if op is not None:
        def counting(*args):
            calls.append(args[0].shape)
            return op(*args)

        monkeypatch.setattr(gemm, "_onednn_linear", lambda: counting)
    return calls


def _fp32_against_fp64_reference(moe, x):
    """The fp32 layer's output and gradients, and those of the fp64 reference loop with the same weights."""
    reference = copy.deepcopy(moe).double()
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for module, inputs in ((moe, x), (reference, x.double())):
        inputs = inputs.clone().requires_grad_(True)
        out = module(inputs) if module is moe else reference_moe(module, inputs)
        (out * target.to(out.dtype)).sum().backward()
        results.append([out, inputs.grad] + [p.grad for p in module.parameters()])
    return results


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("kw", [dict(glu=True, act_layer="silu", bias=False), dict(act_layer="gelu"),
                                dict(glu=True, act_layer="relu", k=3)])
def test_fused_loop_in_fp32_equals_the_reference_with_either_library(library, kw, onednn_calls):
    set_cpu_gemm(library)
    torch.manual_seed(0)
    moe = SparseMoE(32, 48, num_experts=5, dispatch_layout="loop", **kw)
    got, want = _fp32_against_fp64_reference(moe, torch.randn(70, 32))
    hit = int((moe.tokens_per_expert > 0).sum())
    assert len(onednn_calls) == (6 * hit if library == "onednn" else 0)  # 2 layers, 2 input + 2 weight gradients
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_onednn_on_the_worker_threads_equals_the_reference(onednn_calls, monkeypatch):
    set_cpu_gemm("onednn")
    monkeypatch.setattr(workers, "WORKERS_MIN_MEAN_ROWS", 0)
    monkeypatch.setattr(workers, "WORKERS_MIN_EXPERTS", 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        moe = SparseMoE(32, 48, num_experts=4, glu=True, bias=False, dispatch_layout="loop")
        x = torch.randn(200, 32)
        moe(x)
        counts = moe.tokens_per_expert.tolist()
        assert len(plan_expert_groups(torch.device("cpu"), counts, 32 * 96)) == 2  # workers really used
        onednn_calls.clear()
        got, want = _fp32_against_fp64_reference(moe, x)
    finally:
        torch.set_num_threads(before)
    assert len(onednn_calls) == 24  # 4 experts x (2 layers, 2 input + 2 weight gradients)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@needs_onednn
def test_inference_and_default_device_still_use_onednn(onednn_calls):
    set_cpu_gemm("onednn")
    torch.manual_seed(0)
    moe = SparseMoE(32, 48, num_experts=4, glu=True, dispatch_layout="loop")
    x = torch.randn(30, 32)
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out.double(), reference_moe(copy.deepcopy(moe).double(), x.double()),
                               rtol=1e-4, atol=1e-5)
    assert len(onednn_calls) == 2 * int((moe.tokens_per_expert > 0).sum())
    with torch.device("cpu"):
        assert cpu_gemm(x) == "onednn"


@needs_onednn
@pytest.mark.parametrize("vendor, family, expected", [
    ("AuthenticAMD", "26", ("onednn", "onednn")),  # Zen 5: every product
    ("AuthenticAMD", "25", ("onednn", "blas")),  # Zen 4: weight gradients in BLAS
    ("AuthenticAMD", "27", ("onednn", "blas")),  # unmeasured family: the Zen 4 rule
    ("GenuineIntel", "6", ("blas", "blas")),
])
def test_auto_follows_the_measured_machine_rule(monkeypatch, vendor, family, expected):
    x = torch.empty(3, 4)
    set_cpu_gemm("auto")
    try:
        with monkeypatch.context() as patch:
            patch.setattr(gemm, "cpu_fields", lambda: {"vendor_id": vendor, "cpu family": family})
            patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
            gemm._auto_onednn_products.cache_clear()
            assert (cpu_gemm(x), cpu_gemm(x, product="weight_grad")) == expected
            patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
            gemm._auto_onednn_products.cache_clear()
            assert (cpu_gemm(x), cpu_gemm(x, product="weight_grad")) == ("blas", "blas")
    finally:
        gemm._auto_onednn_products.cache_clear()
    set_cpu_gemm("onednn")
    assert (cpu_gemm(x), cpu_gemm(x, product="weight_grad")) == ("onednn", "onednn")


@needs_onednn
@pytest.mark.parametrize("library", ["blas", "onednn"])
def test_weight_gradients_follow_their_own_rule(library, monkeypatch, onednn_calls):
    """With the layers in oneDNN, the weight gradients go where ``product="weight_grad"`` says."""
    set_cpu_gemm("onednn")
    monkeypatch.setattr(gemm, "cpu_gemm", lambda a, modes=True, product="forward": (
        library if product == "weight_grad" else "onednn"))
    monkeypatch.setattr(loop, "cpu_gemm", gemm.cpu_gemm)
    torch.manual_seed(0)
    moe = SparseMoE(32, 48, num_experts=5, glu=True, bias=False, dispatch_layout="loop")
    got, want = _fp32_against_fp64_reference(moe, torch.randn(70, 32))
    hit = int((moe.tokens_per_expert > 0).sum())
    assert len(onednn_calls) == (6 if library == "onednn" else 4) * hit
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's own notice in mkldnn.flags
def test_onednn_falls_back_to_blas_where_it_cannot_run():
    set_cpu_gemm("onednn")
    assert cpu_gemm(torch.empty(3, 4)) == "onednn"
    assert cpu_gemm(torch.empty(3, 4, dtype=torch.bfloat16)) == "blas"
    assert cpu_gemm(torch.empty(3, 4, dtype=torch.float64)) == "blas"
    with torch.backends.mkldnn.flags(enabled=False):
        assert cpu_gemm(torch.empty(3, 4)) == "blas"
    with FlopCounterMode(display=False):
        assert cpu_gemm(torch.empty(3, 4)) == "blas"
    set_cpu_gemm("blas")
    assert cpu_gemm(torch.empty(3, 4)) == "blas"


@needs_onednn
def test_flop_counter_sees_every_product_of_the_fused_loop():
    set_cpu_gemm("onednn")  # the mode must send the products to torch.mm, where it counts them
    torch.manual_seed(0)
    moe = SparseMoE(32, 48, num_experts=4, k=2, glu=True, bias=False, dispatch_layout="loop")
    x = torch.randn(40, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        moe(x).sum().backward()
    routed = 40 * 2
    router = 2 * 40 * 32 * 4 * 3  # forward, input gradient, weight gradient
    experts = 3 * 2 * routed * (32 * 96 + 48 * 32)  # two layers, each forward + two gradients
    assert counter.get_total_flops() == router + experts


def test_bad_choice_names_the_argument():
    with pytest.raises(ValueError, match=r"choice must be one of \('auto', 'blas', 'onednn'\), got 'mkl'"):
        set_cpu_gemm("mkl")
    with pytest.raises(ValueError, match=r"product must be one of \('forward', 'weight_grad'\), got 'bias'"):
        cpu_gemm(torch.empty(1), product="bias")


@pytest.mark.parametrize("value, expected", [("blas", "blas"), ("ONEDNN", "onednn"), ("bogus", None)])
def test_environment_variable_sets_the_choice(value, expected):
    code = "from moemix.layers.cpu_gemm import cpu_gemm_setting; print(cpu_gemm_setting())"
    env = dict(os.environ, MOEMIX_CPU_GEMM=value)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if expected is None:
        assert run.returncode != 0 and "MOEMIX_CPU_GEMM must be one of" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == expected
