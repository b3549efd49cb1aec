"""A full scratch disk fails the image cleanly: one error line naming the image and the cause, nothing left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def test_full_scratch_disk_fails_the_pair_and_leaves_nothing(cd16x_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ultrastyle

    rng = np.random.default_rng(0)
    contents = []
    for name, size in (("big", (640, 480)), ("small", (24, 20))):
        p = tmp_path / f"{name}.png"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(p)
        contents.append(p)
    style = tmp_path / "style.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(style)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    calls = []

    def full(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        if length > 3 * 24 * 20 * 4:  # the small content's canvases still fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with ultrastyle.load(str(cd16x_dir), backend="torch", levels=(1,)) as st:
        # style_size=32: the style's canvas in RAM (at the default 1024 px it would go to the full scratch disk too, and fail all)
        summary = st.stylize_batch(contents, [style], out, max_memory="16MB", scratch=scratch, levels="1", io_memory="1MB", style_size=32)
    assert calls, "the canvases never went to the scratch folder: the test did not test a full disk"
    by = {r.pair.content.name: r for r in summary.results}
    assert by["big.png"].status == "failed" and by["small.png"].status == "done", summary.describe()
    msg = by["big.png"].error or ""
    assert str(contents[0]) in msg and "No space left on device" in msg and str(scratch) in msg and "\n" not in msg, msg
    assert sorted(p.name for p in out.iterdir()) == ["small_stylized_style.png"]  # no partial output
    assert list(scratch.iterdir()) == []  # scratch canvases are unlinked at once
