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


# --- plain TIFF and JPEG outputs, band by band ------------------------------------------------------


@pytest.mark.parametrize("compression", ["deflate", "zstd"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_strip_written_tiff_is_byte_identical_however_banded_and_reads_back(tmp_path: Path, dtype: type, compression: str,
                                                                            monkeypatch) -> None:  # fmt: skip
    import ultrastyle.io.pyramid as pyramid
    from ultrastyle.io.pyramid import write_tiff_strips

    monkeypatch.setattr(pyramid, "_STRIP_BYTES", 257 * 3 * 2 * 7)  # strips of a few rows: bands cross them
    rng = np.random.default_rng(1)
    a = (rng.random((301, 257, 3)) * np.iinfo(dtype).max).astype(dtype)
    whole = write_tiff_strips([a], tmp_path / "whole.tif", 301, 257, dtype, compression=compression)
    bands = write_tiff_strips((a[i : i + 17] for i in range(0, 301, 17)), tmp_path / "bands.tif", 301, 257, dtype,
                              compression=compression)  # fmt: skip
    assert whole.read_bytes() == bands.read_bytes()
    np.testing.assert_array_equal(read_image(bands), a)
    import tifffile

    with tifffile.TiffFile(bands) as tif:
        page = tif.pages[0]
        assert not page.is_tiled and len(page.dataoffsets) > 1  # strips, not one block
        assert page.compression == {"deflate": 8, "zstd": 50000}[compression]  # as asked, 8-bit too (it once wrote 8-bit raw)


def test_short_tiff_bands_leave_no_file(tmp_path: Path) -> None:
    from ultrastyle.io.pyramid import write_tiff_strips

    with pytest.raises(ValueError, match="held 10 rows, the header says 11"):
        write_tiff_strips([np.zeros((10, 8, 3), np.uint8)], tmp_path / "x.tif", 11, 8)
    assert list(tmp_path.iterdir()) == []


def test_streamed_jpeg_decodes_to_the_pixels_pillow_would_write(tmp_path: Path) -> None:
    pytest.importorskip("pyvips", reason="streamed JPEG needs libvips (the vips extra)")
    from ultrastyle.io.images import save_array
    from ultrastyle.io.pyramid import write_jpeg_bands

    src = sorted((Path(__file__).resolve().parents[2] / "shared/images/content").glob("*.jpg"))
    if src:
        a = np.ascontiguousarray(read_image(src[0])[:301, :457])
    else:  # a smooth synthetic image without the shared photos
        y, x = np.mgrid[0:301, 0:457]
        a = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    h, w = a.shape[:2]
    streamed = write_jpeg_bands((a[i : i + 40] for i in range(0, h, 40)), tmp_path / "s.jpg", h, w)
    pillow = save_array(a, tmp_path / "p.jpg", "jpg")
    got, want = read_image(streamed).astype(int), read_image(pillow).astype(int)
    assert got.shape == want.shape == a.shape
    diff = np.abs(got - want)
    assert diff.max() <= 2 and diff.mean() < 0.02, (diff.max(), diff.mean())  # the same libjpeg settings
    assert np.abs(got - a).mean() < 3  # and a JPEG of the image, not of something else


def test_jpeg_failures_name_the_file_and_leave_nothing(tmp_path: Path) -> None:
    pytest.importorskip("pyvips", reason="streamed JPEG needs libvips (the vips extra)")
    from ultrastyle.io.images import ImageError
    from ultrastyle.io.pyramid import write_jpeg_bands

    with pytest.raises(ImageError, match=r"big\.jpg: JPEG holds at most 65500 pixels a side"):
        write_jpeg_bands([], tmp_path / "big.jpg", 10, 70000)

    def failing():
        yield np.zeros((16, 32, 3), np.uint8)
        raise OSError(5, "Input/output error")  # a scratch canvas that cannot be read

    with pytest.raises((OSError, ImageError), match="Input/output error"):
        write_jpeg_bands(failing(), tmp_path / "x.jpg", 64, 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["tiff", "jpg"])
def test_large_canvas_outputs_stream_and_equal_the_whole_conversion(tmp_path: Path, fmt: str, monkeypatch) -> None:
    import ultrastyle.io.pyramid as pyramid

    if fmt == "jpg":
        pytest.importorskip("pyvips", reason="streamed JPEG needs libvips (the vips extra)")
    plain = PyramidOptions(tiff_layout="plain")
    assert not streams(fmt, 1000, 1000, plain) and streams(fmt, 8000, 3000, plain)
    monkeypatch.setattr(pyramid, "PNG_STREAM_BYTES", 1000)  # this small canvas counts as large
    calls = []
    for name in ("write_tiff_strips", "write_jpeg_bands"):
        real = getattr(pyramid, name)
        monkeypatch.setattr(pyramid, name, lambda *a, _real=real, **k: calls.append(_real) or _real(*a, **k))
    y, x = np.mgrid[0:203, 0:150]
    smooth = np.stack([x / 150, y / 203, (x + y) / 353]).astype(np.float32) * 1.2 - 0.1  # out of range too
    c = canvas_from_array(smooth, layout="chw")
    p = save_output(c, tmp_path / f"c.{fmt}", fmt, pyramid=plain)
    assert len(calls) == 1
    want = canvas_to_image(c, np.uint8)
    if fmt == "tiff":
        np.testing.assert_array_equal(read_image(p), want)
    else:
        assert np.abs(read_image(p).astype(int) - want).mean() < 2
