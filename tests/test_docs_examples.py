"""The Python examples of the README and the user guides run as written: each file's ```python blocks are
executed in order in one fresh interpreter (one namespace), the expert-parallel guide inside a one-rank
gloo group.
A block right after an HTML comment starting ``<!-- not run`` is skipped (it says why); one right after
``<!-- own script`` runs alone as a script file in a clean environment (it says why: a Lightning trainer
that starts its own processes)."""
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- (?:not run|own script)[^\n]*-->\s*\n)?```python\n(.*?)```", re.S)


def python_blocks(path: str, kind: str = "") -> list:
    """The blocks of ``path`` preceded by a ``<!-- kind`` comment (``""``: by none)."""
    with open(os.path.join(ROOT, path)) as f:
        return [code for note, code in BLOCK.findall(f.read()) if note.startswith(f"<!-- {kind}" if kind else "")
                and bool(note) == bool(kind)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("guide", ["README.md", "docs/layers.md", "docs/parallel.md", "docs/mix.md", "docs/rl.md",
                                   "docs/adapters.md"])
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


@pytest.mark.parametrize("guide", ["docs/parallel.md"])
def test_own_script_examples_run(guide, tmp_path):
    pytest.importorskip("lightning")
    blocks = python_blocks(guide, "own script")
    assert blocks, f"no own-script examples found in {guide}"
    for i, code in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(code)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]


def test_skipped_blocks_say_why():
    with open(os.path.join(ROOT, "docs", "parallel.md")) as f:
        skipped = [m.group(1) for m in BLOCK.finditer(f.read()) if m.group(1)]
    assert skipped and all(len(s.strip()) > len("<!-- not run -->") for s in skipped)
