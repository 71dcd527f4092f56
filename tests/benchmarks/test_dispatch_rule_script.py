"""benchmarks/dispatch_rule.py times the three layouts per shape, reports what "auto" picks and writes its table."""
import json

from tests.benchmarks.test_row_buffers_script import _run


def test_dispatch_rule_sweep_writes_cases_and_summary(tmp_path):
    out, md = tmp_path / "rule.json", tmp_path / "rule.md"
    _run("benchmarks/dispatch_rule.py", "--shapes", "4:2:32", "--rows", "8", "--repeats", "3", "--threads", "1",
         "--extra", "loop_unchunked", "--json", str(out), "--markdown", str(md))
    results = json.loads(out.read_text())
    (balanced, skewed) = results["cases"]
    assert (balanced["routing"], skewed["routing"]) == ("balanced", "skewed")
    for case in (balanced, skewed):
        assert case["tokens"] == 16 and set(case["ms"]) == {"loop", "padded", "sorted", "loop_unchunked"}
        assert case["over_loop"]["loop_unchunked"] > 0
        assert case["auto"] in case["ms"] and case["auto_over_best"] >= 1.0 - 1e-9
        assert case["padding"] >= 1.0 and case["expert_macs"] > 0
    assert "| 4 | 2 | 32 | 8 | balanced |" in md.read_text() and "auto / best over 2 cases" in results["summary"]


def test_bad_shape_or_variant_is_refused(tmp_path):
    proc = _run("benchmarks/dispatch_rule.py", "--shapes", "4:2", check=False)
    assert proc.returncode != 0 and "--shapes: expected E:k:H" in proc.stderr
    proc = _run("benchmarks/dispatch_rule.py", "--shapes", "4:2:32", "--extra", "loop_fast", check=False)
    assert proc.returncode != 0 and "--extra: expected names from" in proc.stderr and "loop_fast" in proc.stderr
