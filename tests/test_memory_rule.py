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


def test_peak_memory_is_read_in_each_platforms_unit(monkeypatch):
    """getrusage's ru_maxrss is KiB on Linux and bytes on macOS: doctor's baseline read 1024x too big there."""
    import resource
    import sys

    from ultrastyle.runtime import memory

    class Usage:
        ru_maxrss = 300_000

    monkeypatch.setattr(resource, "getrusage", lambda who: Usage())
    monkeypatch.setattr(sys, "platform", "linux")
    assert memory.peak_resident_bytes() == 300_000 * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert memory.peak_resident_bytes() == 300_000


def test_the_baseline_child_imports_nothing_windows_lacks():
    """The child that measures doctor's baseline imported `resource`: both baselines were 'unusable' on Windows."""
    from ultrastyle.runtime.memory import _BASELINE_SCRIPT

    assert "resource" not in _BASELINE_SCRIPT and "peak_resident_bytes()" in _BASELINE_SCRIPT


@pytest.mark.parametrize("version", [1, 2])
def test_a_jobs_memory_cgroup_limit_bounds_the_memory_runs_plan_with(tmp_path, monkeypatch, version):
    """A SLURM or Kubernetes job on a large node: its canvases were planned by the node's free RAM, past its own limit."""
    from ultrastyle.runtime import memory

    root = tmp_path / "cgroup"
    if version == 2:
        (tmp_path / "self").write_text("0::/job_7/step_0\n")
        job, step = root / "job_7", root / "job_7" / "step_0"
        files = {job: ("memory.max", "memory.current"), step: ("memory.max", "memory.current")}
        values = {job: ("3000000000", "1000000000"), step: ("max", "900000000")}
        stat = "inactive_file"
    else:
        (tmp_path / "self").write_text("4:memory:/job_7/step_0\n3:cpuset:/\n")
        job, step = root / "memory" / "job_7", root / "memory" / "job_7" / "step_0"
        files = {d: ("memory.limit_in_bytes", "memory.usage_in_bytes") for d in (job, step)}
        values = {job: ("3000000000", "1000000000"), step: ("9223372036854771712", "900000000")}
        stat = "total_inactive_file"
    for d in (job, step):
        d.mkdir(parents=True)
        for name, value in zip(files[d], values[d]):
            (d / name).write_text(value + "\n")
    (job / "memory.stat").write_text(f"anon 1\n{stat} 250000000\n")  # page cache the kernel takes back first: not in use
    monkeypatch.setattr(memory, "CGROUP_FILE", str(tmp_path / "self"))
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(root))
    assert memory.cgroup_room() == 3_000_000_000 - (1_000_000_000 - 250_000_000)  # the job's limit; the step has none
    assert memory.available_bytes() <= memory.cgroup_room()
    (job / "memory.max" if version == 2 else job / "memory.limit_in_bytes").write_text("max\n" if version == 2 else "9223372036854771712\n")
    assert memory.cgroup_room() is None  # no limit anywhere: the node's figure stands
