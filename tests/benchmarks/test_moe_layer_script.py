"""benchmarks/moe_layer.py with the loop_blas variant and the report's GEMM-library table run end to end
(tiny repeat count)."""
import json

from tests.benchmarks.test_row_buffers_script import _run


def test_loop_blas_variant_is_timed_and_the_report_renders_the_gemm_library_table(tmp_path):
    out = tmp_path / "moe.json"
    _run("benchmarks/moe_layer.py", "--quick", "--configs", "small_coarse", "--routings", "balanced",
         "--layouts", "loop,loop_blas", "--repeats", "2", "--threads", "1", "--no-memory", "--json", str(out))
    results = json.loads(out.read_text())
    assert results["meta"]["cpu_gemm"] in ("onednn", "blas")
    entry = results["small_coarse"]
    assert set(entry["ms"]) >= {"moemix", "hf_loop", "gshard", "dense_active", "moemix:loop", "moemix:loop_blas"}
    assert entry["vs_hf_loop"] > 0 and entry["vs_dense_active"] > 0
    assert set(entry["param_dtypes"].values()) == {"float32"}
    timings = results["small_coarse"]["timing_detail"]
    assert len(timings["moemix:loop_blas"]["samples_ms"]) == len(timings["moemix:loop"]["samples_ms"]) >= 2
    assert all(t["minor_faults"] >= 0 for t in timings.values())
    assert results["meta"]["cpu"]  # the CPU model the run timed
    title = "## CPU: the fused loop's GEMM library"
    report = _run("benchmarks/moe_layer_report.py", str(out)).stdout
    assert f"fused-loop GEMMs in {results['meta']['cpu_gemm']}" in report
    # the table compares the loop in oneDNN with the loop in torch.mm: left out where both are torch.mm
    assert (title in report) == (results["meta"]["cpu_gemm"] == "onednn")
    results["meta"]["cpu_gemm"] = "onednn"  # a run recorded on a machine whose loop runs in oneDNN
    onednn_run = tmp_path / "moe_onednn.json"
    onednn_run.write_text(json.dumps(results))
    section = _run("benchmarks/moe_layer_report.py", str(onednn_run)).stdout.split(title)[1]
    assert "Runs whose fused loop ran its fp32 products in `onednn`" in section
    assert "| small_coarse |" in section


def _report_module():
    import importlib.util
    import os
    import sys

    from tests.benchmarks.test_row_buffers_script import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("moe_layer_report",
                                                      os.path.join(ROOT, "benchmarks", "moe_layer_report.py"))
        report = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(report)
    finally:
        sys.path.pop(0)
    return report


def test_runs_table_gives_each_group_of_runs_its_median():
    report = _report_module()
    runs = [{"meta": {}, "small_coarse": {"vs_hf_loop": v}} for v in (1.0, 1.2, 1.4, 2.0, 1.1, 1.3)]
    lines = report.runs_table(runs, since=[3, 4, 5])  # groups: runs 3 (one run: no median), 4, 5-6
    assert lines[0].endswith("| run 6 | median | median of runs 5-6 | target |")
    assert "median of runs 3" not in lines[0] and "median of runs 4" not in lines[0]
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "small_coarse" and cells[7:9] == ["1.25", "1.20"]  # all six; runs 5-6


def test_gemm_library_table_gives_each_group_of_runs_its_median():
    report = _report_module()

    def run(blas_over_loop):
        loop = {"ms": 10.0, "samples_ms": [10.0, 10.0, 10.0]}
        blas = {"ms": 10.0 * blas_over_loop, "samples_ms": [10.0 * blas_over_loop] * 3}
        return {"meta": {}, "small_coarse": {"timing_detail": {"moemix:loop": loop, "moemix:loop_blas": blas}}}

    # runs 1-2 on one machine, runs 4-5 on another (run 3, BLAS by default, left out), plus an unnumbered run
    named = [("run 1", 1, run(1.1)), ("run 2", 2, run(1.3)), ("run 4", 4, run(2.0)), ("run 5", 5, run(1.8)),
             ("reuse", None, run(1.0))]
    lines = report.gemm_library_table(named, report.run_groups(5, [1, 3, 4]))  # groups 1-2, 3-3, 4-5
    assert lines[0].endswith("| reuse | median | median of runs 1-2 | median of runs 4-5 |")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[0] == "small_coarse" and cells[8:] == ["1.300", "1.200", "1.900"]
