"""Crafted files that once hung a run, passed the size limits, or swapped a verified model: each is one clear error."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from ultrastyle.io.images import ImageError, read_image


def _looped_tiff(path) -> None:
    """Two pages whose second directory points back to the first: a chain of pages without an end."""
    import tifffile

    tifffile.imwrite(path, np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as t:
        offsets = [p.offset for p in t.pages]
    b = bytearray(path.read_bytes())
    n = struct.unpack_from("<H", b, offsets[1])[0]
    struct.pack_into("<I", b, offsets[1] + 2 + 12 * n, offsets[0])
    path.write_bytes(bytes(b))


def test_a_tiff_whose_pages_loop_is_read_not_followed_forever(tmp_path):
    p = tmp_path / "loop.tif"
    _looped_tiff(p)
    code = f"from ultrastyle.io.images import read_image, tiff_pages; print(tiff_pages({str(p)!r}), read_image({str(p)!r}).shape)"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60)  # hung forever before
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "2 (8, 8, 3)", r.stderr


@pytest.mark.parametrize(("samples", "dtype"), [(32, "float64"), (6, "uint8")])
def test_a_tiff_of_more_samples_than_an_image_has_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch, samples, dtype):
    import tifffile

    p = tmp_path / "many.tif"
    tifffile.imwrite(p, np.zeros((64, 64, samples), dtype), photometric="minisblack", planarconfig="contig", metadata=None)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))  # 4 GiB for a 4 MB file once
    with pytest.raises(ImageError, match=rf"many\.tif: a TIFF of {samples} samples per pixel; images of at most 4 samples"):
        read_image(p)
