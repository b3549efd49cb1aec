"""PNG outputs written band by band (io.pyramid.write_png_bands): the same bytes however the rows are cut, the same pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.io.images import read_image
from ultrastyle.io.pyramid import PNG_STREAM_BYTES, PyramidOptions, save_output, streams, write_png_bands
from ultrastyle.runtime.tiled import canvas_to_image


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("level", [1, 6])
def test_band_written_png_is_byte_identical_to_one_band(tmp_path: Path, dtype: type, level: int) -> None:
    rng = np.random.default_rng(level)
    a = (rng.random((301, 257, 3)) * np.iinfo(dtype).max).astype(dtype)
    a[100:200] = a[100:101]  # runs for the compressor
    whole = write_png_bands([a], tmp_path / "whole.png", 301, 257, dtype, level=level)
    bands = write_png_bands((a[i : i + 17] for i in range(0, 301, 17)), tmp_path / "bands.png", 301, 257, dtype, level=level)
    assert whole.read_bytes() == bands.read_bytes()
    np.testing.assert_array_equal(read_image(bands), a)  # and a reader agrees on every pixel


def test_short_bands_leave_no_file(tmp_path: Path) -> None:
    a = np.zeros((10, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="held 10 rows, the header says 11"):
        write_png_bands([a], tmp_path / "x.png", 11, 8)
    assert list(tmp_path.iterdir()) == []  # the temp file went with the error


def test_canvas_png_output_streams_above_the_threshold_and_equals_the_whole_conversion(tmp_path: Path) -> None:
    assert not streams("png", 1000, 1000, PyramidOptions()) and streams("png", 8000, 3000, PyramidOptions())
    assert 8000 * 3000 * 3 > PNG_STREAM_BYTES
    rng = np.random.default_rng(0)
    c = canvas_from_array(rng.random((3, 203, 150), dtype=np.float32) * 1.2 - 0.1, layout="chw")  # out of range too
    for depth in (8, 16):
        p = save_output(c, tmp_path / f"c{depth}.png", "png", depth=depth)
        np.testing.assert_array_equal(read_image(p), canvas_to_image(c, np.uint8 if depth == 8 else np.uint16))
