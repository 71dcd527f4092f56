"""benchmarks/cpu_gemm.py times every product both ways and writes its JSON and table (tiny repeat count)."""
import json

import pytest
import torch

from moemix.layers.cpu_gemm import onednn_gemm_usable
from tests.benchmarks.test_row_buffers_script import _run


@pytest.mark.skipif(not onednn_gemm_usable(torch.empty(1)), reason="torch without oneDNN's fp32 linear")
def test_products_are_timed_with_both_libraries_and_the_table_is_written(tmp_path):
    out, md = tmp_path / "gemm.json", tmp_path / "gemm.md"
    _run("benchmarks/cpu_gemm.py", "--configs", "small_fine", "--repeats", "2", "--threads", "1",
         "--json", str(out), "--markdown", str(md))
    case = json.loads(out.read_text())["small_fine"]
    assert len(case) == 7  # six products of the fused loop and the padded layout's first layer
    assert case["layer 1: x @ w1"]["shape"] == "16x512 @ 512x512"
    assert all(e["mm_ms"] > 0 and e["onednn_ms"] > 0 and e["mm_over_onednn"] > 0 for e in case.values())
    table = md.read_text()
    assert "| small_fine | weight grad 2: a^T @ g | 256x16 @ 16x512 |" in table


@pytest.mark.skipif(not onednn_gemm_usable(torch.empty(1)), reason="torch without oneDNN's fp32 linear")
def test_rows_option_times_the_products_at_the_given_rows_per_expert(tmp_path):
    out = tmp_path / "rows.json"
    _run("benchmarks/cpu_gemm.py", "--configs", "small_fine", "--rows", "8,24", "--repeats", "2", "--threads", "1",
         "--json", str(out))
    results = json.loads(out.read_text())
    assert set(results) == {"meta", "small_fine@8", "small_fine@24"}
    assert len(results["small_fine@24"]) == 6  # the fused loop's products only
    assert results["small_fine@24"]["weight grad 1: x^T @ gh"]["shape"] == "512x24 @ 24x512"
