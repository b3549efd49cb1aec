"""The README's Python examples run as written (from a folder with ../shared beside it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert blocks and any("ultrastyle.stylize(" in b for b in blocks) and any("stylize_batch(" in b for b in blocks)


def test_readme_python_examples_run(cd16x_dir: Path, tmp_path: Path, shared_dir: Path):
    from ultrastyle.models import zoo

    zoo.import_local("cd-wct-16x", cd16x_dir)  # offline, as the quick start does
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_dir)
    for i, code in enumerate(python_blocks()):
        r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README python block {i + 1} failed:\n{code}\n{r.stderr[-3000:]}"
    outputs = sorted(p.name for p in (work / "out").iterdir())
    assert "mix.png" in outputs and len([p for p in outputs if p.endswith(".jpg")]) == 3, outputs
    with Image.open(work / "out" / "mix.png") as im:
        assert max(im.size) == 256 and np.asarray(im).std() > 10
