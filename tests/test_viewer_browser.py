"""The Deep Zoom viewer page in a real headless Chromium: it opens from file://, loads tiles and draws the image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultrastyle.io.pyramid import write_dzi

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs a headless Chromium (Debian: apt-get install chromium-headless-shell)")


def _image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, ((x // 250 + y // 250) % 2) * 200 + 30], -1).astype(np.uint8)


@pytest.mark.parametrize("tiles", ["jpg", "png"])
def test_viewer_page_shows_the_pyramid_in_chromium(tmp_path: Path, tiles: str) -> None:
    from ultrastyle.io.pyramid import PyramidOptions

    h, w = 2000, 3000
    a = _image(h, w)
    write_dzi(a, tmp_path / "img.dzi", PyramidOptions(dzi_tile_format=tiles))
    shot = tmp_path / "shot.png"
    for budget_ms in (10_000, 30_000, 90_000):  # a loaded machine may need longer before the tiles are drawn
        r = subprocess.run([BROWSER, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=800,600",
                            f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", (tmp_path / "img.html").as_uri()],
                           capture_output=True, text=True, timeout=180)  # fmt: skip
        assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
        s = np.asarray(Image.open(shot).convert("RGB"), np.float32)
        if s.std() > 40:
            break
    assert s.shape == (600, 800, 3)
    assert s.std() > 40  # not blank, not uniform
    # Fitted to the window: 800 x 533, centred vertically; the toolbar covers the top-left corner.
    top = (600 - 533) // 2
    want = np.asarray(Image.fromarray(a).resize((800, 533), Image.Resampling.BOX), np.float32)
    got = s[top : top + 533]
    mask = np.ones(got.shape[:2], bool)
    mask[: 50 - top, :320] = False
    err = np.abs(got - want)[mask]
    assert err.mean() < 8, err.mean()  # the image the tiles hold, at the zoom the page shows
    assert np.abs(s[:top - 2, 400:] - [30, 30, 30]).max() < 8  # the letterbox is the page's background
