"""benchmarks/host_overhead.py times every variant at negligible widths and writes its JSON and table."""
import json

from tests.benchmarks.test_row_buffers_script import _run


def test_every_variant_is_timed_against_the_peer_and_the_table_is_written(tmp_path):
    out, md = tmp_path / "host.json", tmp_path / "host.md"
    _run("benchmarks/host_overhead.py", "--fresh-buffers", "--steps", "1", "--repeats", "2",
         "--json", str(out), "--markdown", str(md))
    results = json.loads(out.read_text())
    assert results["meta"]["fresh_buffers"] is True
    assert [(r["E"], r["k"]) for r in results["rows"]] == [(8, 2), (64, 8)]
    for row in results["rows"]:
        assert {"moemix:padded", "moemix:grouped_mm", "gshard", "dense_active"} <= set(row["us_per_step"])
        assert all(t > 0 for t in row["us_per_step"].values()) and row["vs_peer"]["gshard"] == 1.0
    assert "| 64 | 8 |" in md.read_text()
