"""The Python examples of the README and the user guides run as written: each file's ```python blocks are
executed in order in one fresh interpreter (one namespace), the expert-parallel guide inside a one-rank
gloo group.
A block right after an HTML comment starting ``<!-- not run`` is skipped (it says why)."""
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- not run[^\n]*-->\s*\n)?```python\n(.*?)```", re.S)


def python_blocks(path: str) -> list:
    with open(os.path.join(ROOT, path)) as f:
        return [code for skip, code in BLOCK.findall(f.read()) if not skip]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("guide", ["README.md", "docs/layers.md", "docs/parallel.md", "docs/mix.md"])
def test_guide_examples_run(guide, tmp_path):
    pytest.importorskip("timm")
    blocks = python_blocks(guide)
    assert blocks, f"no python examples found in {guide}"
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_skipped_blocks_say_why():
    with open(os.path.join(ROOT, "docs", "parallel.md")) as f:
        skipped = [m.group(1) for m in BLOCK.finditer(f.read()) if m.group(1)]
    assert skipped and all(len(s.strip()) > len("<!-- not run -->") for s in skipped)
