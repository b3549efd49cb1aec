"""PNGs whose header claims more pixels than their data holds are refused before any large allocation."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultrastyle.io.images import ImageError, check_png_data, png_data_size, read_image

REPO = Path(__file__).resolve().parents[1]
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, raw: bytes, *, depth: int = 8, ctype: int = 2, interlace: int = 0, idat_split: int = 0) -> bytes:
    """A PNG with this header and ``raw`` (filtered scanlines) deflated as its image data, in several IDATs if asked."""
    data = zlib.compress(raw, 9)
    parts = [data[i : i + idat_split] for i in range(0, len(data), idat_split)] if idat_split else [data]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, ctype, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(_chunk(b"IDAT", p) for p in parts) + _chunk(b"IEND", b"")


def _scanlines(a: np.ndarray) -> bytes:
    """(h, w, c) uint8 -> unfiltered scanlines (filter byte 0 each)."""
    h = a.shape[0]
    return np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], axis=1).tobytes()


def _short_png(path: Path, width: int, height: int, rows: int = 3) -> Path:
    path.write_bytes(_png(width, height, _scanlines(np.full((rows, width, 3), 128, np.uint8))))
    return path


def test_bogus_headers_fail_at_once_with_one_message(tmp_path: Path) -> None:
    for w, h in ((2000, 2000), (19000, 19000)):
        p = _short_png(tmp_path / f"bomb{w}.png", w, h)
        assert p.stat().st_size < 400
        with pytest.raises(ImageError) as e:
            read_image(p)
        msg = str(e.value)
        assert msg.startswith(f"{p}: truncated PNG") and f"{w}x{h}" in msg and "\n" not in msg


def test_the_refusal_decodes_nothing_and_allocates_nothing_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any decoder runs; in a fresh process, peak RSS after the bombs is that after a small valid image, give or take 64 MB."""
    import PIL.Image
    import PIL.ImageFile

    import ultrastyle.io.images as images

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    bombs = [str(_short_png(tmp_path / f"b{w}.png", w, w)) for w in (2000, 19000)]

    def decoder_reached(*args, **kwargs):
        pytest.fail("a decoder ran on a PNG whose data cannot fill its header's size (the refusal comes before any decoding)")

    with monkeypatch.context() as m:  # every Pillow decoder is made by _getdecoder; load() and the 16-bit reader would use them
        m.setattr(PIL.Image, "_getdecoder", decoder_reached)
        m.setattr(PIL.ImageFile.ImageFile, "load", decoder_reached)
        m.setattr(images, "_read_rgb16", decoder_reached)
        for p in bombs:
            with pytest.raises(ImageError, match="truncated PNG"):
                read_image(p)
    code = textwrap.dedent(f"""
        import json, resource
        from ultrastyle.io.images import ImageError, read_image
        read_image({str(good)!r})
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = []
        for p in {bombs!r}:
            try:
                read_image(p)
                out.append("accepted")
            except ImageError as exc:
                out.append(str(exc))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"grew_kb": peak - base, "results": out}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(got["results"]) == 2 and all("truncated PNG" in msg for msg in got["results"]), got
    assert got["grew_kb"] < 64 * 1024, got


def test_data_short_by_a_few_rows_is_found_by_inflating(tmp_path: Path) -> None:
    """Noise passes the ratio bound; the stream is inflated (in pieces) and counted."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1990, 2000, 3), dtype=np.uint8)
    p = tmp_path / "short.png"
    p.write_bytes(_png(2000, 2000, _scanlines(a), idat_split=65536))
    with pytest.raises(ImageError, match=r"ends after .* 1990 of 2000 rows"):
        read_image(p)
    with pytest.raises(ImageError, match="1990 of 2000 rows"):
        check_png_data(p, chunk=4096)  # small pieces: the same count
    full = tmp_path / "full.png"
    full.write_bytes(_png(2000, 10, _scanlines(a[:10]), idat_split=1000))
    np.testing.assert_array_equal(read_image(full), a[:10])


def test_16_bit_rgb_goes_through_the_same_check(tmp_path: Path) -> None:
    a = np.full((2, 300, 3), 1000, ">u2")
    p = tmp_path / "deep.png"
    p.write_bytes(_png(300, 300, _scanlines(a.view(np.uint8).reshape(2, 300, 6)), depth=16))
    with pytest.raises(ImageError, match="truncated PNG"):
        read_image(p)


def test_corrupt_image_data_is_named_corrupt(tmp_path: Path) -> None:
    raw = _scanlines(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = bytearray(zlib.compress(raw))
    data[20:40] = b"\xff" * 20
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    p = tmp_path / "corrupt.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(data)) + _chunk(b"IEND", b""))
    with pytest.raises(ImageError, match=f"{p}: (corrupt|truncated)"):
        read_image(p)


def _adam7(a: np.ndarray) -> bytes:
    out = b""
    for x0, y0, dx, dy in _ADAM7:
        sub = a[y0::dy, x0::dx]
        if sub.size:
            out += _scanlines(sub)
    return out


@pytest.mark.parametrize(("w", "h"), [(1, 1), (3, 2), (13, 9), (64, 33)])
def test_interlaced_sizes_are_counted_per_pass(tmp_path: Path, w: int, h: int) -> None:
    a = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    raw = _adam7(a)
    assert png_data_size(w, h, 8, 2, True) == len(raw)
    p = tmp_path / "i.png"
    p.write_bytes(_png(w, h, raw, interlace=1))
    np.testing.assert_array_equal(read_image(p), a)
    if len(raw) > 1:
        p.write_bytes(_png(w, h, raw[:-1], interlace=1))
        with pytest.raises(ImageError, match="truncated PNG"):
            read_image(p)


def test_every_pil_mode_still_reads(tmp_path: Path) -> None:
    a = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    base = Image.fromarray(a)
    images = [base.convert(m) for m in ("RGB", "L", "P", "RGBA", "1", "LA")]
    images.append(Image.fromarray((a[..., 0].astype(np.uint16) * 257)))
    for i, im in enumerate(images):
        p = tmp_path / f"m{i}.png"
        im.save(p)
        assert read_image(p).shape == (37, 53, 3)
