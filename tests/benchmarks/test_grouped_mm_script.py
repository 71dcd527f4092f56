"""benchmarks/grouped_mm.py checks the three GEMM forms against each other and writes its JSON and table."""
import importlib.util
import json
import os

import torch

from tests.benchmarks._script import ROOT, run_script as _run


def test_grouped_mm_benchmark_checks_times_and_writes(tmp_path):
    out, md = tmp_path / "gmm.json", tmp_path / "gmm.md"
    _run("benchmarks/grouped_mm.py", "--configs", "small_fine", "--repeats", "2", "--threads", "1",
         "--json", str(out), "--markdown", str(md))
    results = json.loads(out.read_text())
    case = results["small_fine"]
    assert case["rows_per_expert"] == 16
    assert set(case["ms"]) == {"per_slice", "padded_bmm", "grouped_mm"} and min(case["ms"].values()) > 0
    assert all(d <= 1e-5 for d in case["check_rel_diff"].values())  # the same products, float32
    assert case["per_slice_over_grouped_mm"] > 0 and case["padded_bmm_over_grouped_mm"] > 0
    assert "| small_fine | 16 |" in md.read_text()


def test_a_variant_that_raises_is_reported_and_left_out(monkeypatch):
    """A kernel that does not take the dtype (simulated) leaves the other variants to be timed."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("_grouped_mm_bench",
                                                  os.path.join(ROOT, "benchmarks", "grouped_mm.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def unsupported(*args, **kwargs):
        raise RuntimeError("grouped_mm: this dtype is not supported here")

    monkeypatch.setattr(bench.F, "grouped_mm", unsupported)
    steps = bench.make_steps(4, 8, 16, "cpu", torch.float32)
    diffs = bench.check(steps, torch.float32)
    assert set(steps) == {"per_slice", "padded_bmm"} and diffs["padded_bmm"] <= 1e-5
    assert diffs["grouped_mm"].startswith("failed: RuntimeError: grouped_mm: this dtype")
