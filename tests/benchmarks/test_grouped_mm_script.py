"""benchmarks/grouped_mm.py checks the three GEMM forms against each other and writes its JSON and table."""
import json

from tests.benchmarks.test_row_buffers_script import _run


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
