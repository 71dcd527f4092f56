"""benchmarks/moe_layer.py run end to end (tiny repeat count): forced layouts, JSON and the results page."""
import json

from tests.benchmarks._script import run_script


def test_layer_benchmark_times_every_variant_and_writes_json_and_markdown(tmp_path):
    out, page = tmp_path / "moe.json", tmp_path / "moe.md"
    run_script("benchmarks/moe_layer.py", "--quick", "--configs", "small_coarse", "--routings", "balanced",
               "--layouts", "sorted,padded", "--repeats", "2", "--threads", "1", "--no-memory",
               "--json", str(out), "--markdown", str(page))
    results = json.loads(out.read_text())
    entry = results["small_coarse"]
    assert set(entry["ms"]) >= {"moemix", "hf_loop", "gshard", "dense_active", "moemix:sorted", "moemix:padded"}
    assert entry["vs_hf_loop"] > 0 and entry["vs_dense_active"] > 0
    assert set(entry["param_dtypes"].values()) == {"float32"}
    assert all(d <= 1e-4 for d in entry["check_max_abs_diff"].values())  # the same function before timing
    assert len(entry["timing_detail"]["moemix:sorted"]["samples_ms"]) >= 2
    assert results["meta"]["cpu"] and results["meta"]["torch"]
    text = page.read_text()
    assert text.startswith("# Forward+backward speed of one MoE layer")
    assert "| small_coarse |" in text and results["meta"]["command"] in text
