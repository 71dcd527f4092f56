"""The megablocks peer of benchmarks/moe_layer.py: moemix's weights in megablocks' layout compute moemix's
function (checked with megablocks' forward written out in torch, since megablocks itself needs CUDA),
and the benchmark's bfloat16 mode runs end to end."""
import importlib.util
import json
import os

import pytest
import torch

from moemix.layers import SparseMoE
from tests.benchmarks._script import ROOT, run_script as _run


def _load_peer():
    spec = importlib.util.spec_from_file_location("_megablocks", os.path.join(ROOT, "benchmarks", "_megablocks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:renormalize=True with k=1")
@pytest.mark.parametrize("num_experts,k", [(4, 1), (8, 2), (16, 4)])
def test_megablocks_layout_computes_moemix_function(num_experts, k):
    peer = _load_peer()
    torch.manual_seed(0)
    moe = SparseMoE(32, 24, act_layer="silu", glu=True, bias=False, num_experts=num_experts, k=k,
                    renormalize=True).double()  # as the peer's moe_normalize_expert_weights=1, at k=1 too
    x = torch.randn(200, 32, dtype=torch.float64)
    weights = peer.megablocks_weights(moe)
    assert {n: tuple(w.shape) for n, w in weights.items()} == {
        "router": (num_experts, 32), "w1": (num_experts * 24, 32), "v1": (num_experts * 24, 32),
        "w2": (num_experts * 24, 32)}
    with torch.no_grad():
        torch.testing.assert_close(peer.reference_forward(weights, x, k), moe(x))


def test_megablocks_layout_keeps_gate_and_up_apart():
    peer = _load_peer()
    torch.manual_seed(1)
    moe = SparseMoE(16, 8, act_layer="silu", glu=True, bias=False, num_experts=4, k=2).double()
    x = torch.randn(50, 16, dtype=torch.float64)
    weights = peer.megablocks_weights(moe)
    swapped = dict(weights, w1=weights["v1"], v1=weights["w1"])
    with torch.no_grad():
        assert (peer.reference_forward(swapped, x, 2) - moe(x)).abs().max() > 1e-3


def test_bfloat16_run_records_its_dtype_on_its_page(tmp_path):
    out, page = tmp_path / "bf16.json", tmp_path / "bf16.md"
    _run("benchmarks/moe_layer.py", "--quick", "--configs", "small_coarse", "--routings", "balanced",
         "--repeats", "2", "--threads", "1", "--no-memory", "--dtype", "bfloat16", "--json", str(out),
         "--markdown", str(page))
    results = json.loads(out.read_text())
    assert results["meta"]["dtype"] == "bfloat16"
    case = results["small_coarse"]
    assert set(case["ms"]) >= {"moemix", "hf_loop", "gshard", "dense_active"}
    assert set(case["param_dtypes"]) == set(case["ms"]) and set(case["param_dtypes"].values()) == {"bfloat16"}
    assert "bfloat16" in page.read_text() and "| small_coarse |" in page.read_text()
