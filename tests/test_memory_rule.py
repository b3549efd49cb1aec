"""The memory rule, read from the OS: a run's peak resident set <= the baseline (`measure_baseline`) + max_memory.

Run in child processes, so neither the test process nor other tests count. The
content is decoded and resized as a stream (its whole read would not fit the
decoded-image allowance), so the image itself is inside the budget too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ultrastyle.runtime.memory import measure_baseline

pytest.importorskip("pyvips", reason="the rule covers the decoded image through streaming reads (pip install 'ultrastyle[vips]')")

_RUN = """
import resource, sys
from ultrastyle.cli.main import app
try:
    app(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


@pytest.mark.slow
@pytest.mark.parametrize("budget_mb", [300])
def test_peak_rss_within_baseline_plus_budget(cd16x_dir: Path, shared_dir: Path, tmp_path: Path, budget_mb: int) -> None:
    photo = shared_dir / "images/large/lomiri_Dragonfly_by_Bolly.jpg"  # 13.4 MP
    style = shared_dir / "images/style/cd_style_in1.jpg"
    baseline = measure_baseline(str(cd16x_dir), "onnxruntime")
    peak_file = tmp_path / "peak"
    argv = ["stylize", str(photo), "--style", str(style), "-o", str(tmp_path / "out"), "--model", str(cd16x_dir),
            "--content-size", "2400", "--max-memory", f"{budget_mb}MB", "--backend", "onnxruntime"]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", _RUN, str(peak_file), *argv], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning:" not in r.stderr, r.stderr  # streamed, not read whole
    peak = int(peak_file.read_text())
    limit = baseline + budget_mb * 10**6
    assert peak <= limit, f"peak {peak / 2**20:.0f} MiB > baseline {baseline / 2**20:.0f} MiB + {budget_mb} MB"
    assert (tmp_path / "out" / "lomiri_Dragonfly_by_Bolly_stylized_cd_style_in1.png").is_file()
