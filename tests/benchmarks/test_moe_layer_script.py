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
    report = _run("benchmarks/moe_layer_report.py", str(out)).stdout
    section = report.split("## CPU: the fused loop's GEMM library")[1]
    assert f"default library for the fused loop's fp32 products is `{results['meta']['cpu_gemm']}`" in section
    assert "| small_coarse |" in section
