"""benchmarks/row_buffers.py and its table in the MoE report run end to end (tiny repeat count)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=check)


def test_row_buffers_benchmark_writes_its_json_and_the_report_renders_it(tmp_path):
    out = tmp_path / "rows.json"
    _run("benchmarks/row_buffers.py", "--configs", "small_coarse", "--routings", "balanced", "--repeats", "2",
         "--threads", "1", "--json", str(out))
    results = json.loads(out.read_text())
    case = results["small_coarse"]
    assert set(case["ms"]) == {"recycled", "fresh", "hf_loop"}
    assert all(v >= 0 for v in case["faults_per_step"].values())
    assert case["fresh_over_recycled"] > 0 and case["vs_hf_loop"] > 0
    report = _run("benchmarks/moe_layer_report.py", "docs/results/moe_layer_cpu.json",
                  "--row-buffers", str(out)).stdout
    assert "## CPU: recycled temporaries of the buffer layouts against fresh ones" in report
    assert "| small_coarse |" in report.split("recycled temporaries")[1]
