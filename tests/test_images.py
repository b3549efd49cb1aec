"""Image I/O: every mode becomes (3, H, W) RGB float, bad files give one clear ImageError, saves are atomic.

Fast: no models, only tiny images made in tmp_path.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import pytest
import torch
from PIL import Image

import ultrastyle.io.images
from ultrastyle.io.images import ImageError, load_image, read_image, resize_long_side, save_image
from ultrastyle.io.paths import expand_inputs

TOL = 1.0 / 255 / 2 + 1e-6  # half an 8-bit step


def _rgb(t: torch.Tensor, x: int, y: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in t[:, y, x])


def _assert_rgb(t: torch.Tensor, x: int, y: int, expected_255: tuple[int, int, int], tol: float = TOL) -> None:
    got = np.array(_rgb(t, x, y))
    want = np.array(expected_255, dtype=np.float64) / 255.0
    assert np.abs(got - want).max() <= tol, f"pixel ({x},{y}): got {got * 255}, expected {expected_255}"


def _assert_rgb_tensor(t: torch.Tensor, h: int, w: int) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert tuple(t.shape) == (3, h, w)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def _partials(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if "partial" in p.name]


# ---------------------------------------------------------------- modes


def test_rgb_png_loads_as_float32_chw_in_unit_range(tmp_path: Path) -> None:
    a = np.zeros((3, 5, 3), dtype=np.uint8)  # H=3, W=5
    a[0, 0] = (255, 0, 0)
    a[2, 4] = (10, 20, 30)
    a[1, 2] = (255, 255, 255)
    Image.fromarray(a, "RGB").save(tmp_path / "rgb.png")
    t = load_image(tmp_path / "rgb.png")
    _assert_rgb_tensor(t, 3, 5)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1).float() / 255.0)
    assert t.is_contiguous()


def test_load_image_accepts_str_path(tmp_path: Path) -> None:
    Image.new("RGB", (4, 2), (0, 128, 255)).save(tmp_path / "s.png")
    t = load_image(str(tmp_path / "s.png"))
    _assert_rgb_tensor(t, 2, 4)
    _assert_rgb(t, 3, 1, (0, 128, 255))


def test_grey_L_becomes_rgb_with_equal_channels(tmp_path: Path) -> None:
    a = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "l.png")
    t = load_image(tmp_path / "l.png")
    _assert_rgb_tensor(t, 2, 2)
    for (x, y), v in {(0, 0): 0, (1, 0): 100, (0, 1): 200, (1, 1): 255}.items():
        _assert_rgb(t, x, y, (v, v, v))


def test_grey_with_alpha_LA_is_composited_over_white(tmp_path: Path) -> None:
    im = Image.new("LA", (3, 1))
    im.putpixel((0, 0), (100, 255))  # opaque grey
    im.putpixel((1, 0), (0, 0))  # fully transparent black -> white
    im.putpixel((2, 0), (0, 128))  # half-transparent black -> ~mid grey
    im.save(tmp_path / "la.png")
    t = load_image(tmp_path / "la.png")
    _assert_rgb_tensor(t, 1, 3)
    _assert_rgb(t, 0, 0, (100, 100, 100))
    _assert_rgb(t, 1, 0, (255, 255, 255))
    _assert_rgb(t, 2, 0, (127, 127, 127), tol=1.5 / 255)


def test_palette_P_without_transparency_maps_through_palette(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    pal = [0, 0, 0] * 256
    pal[3:6] = [255, 0, 0]
    pal[6:9] = [12, 34, 56]
    im.putpalette(pal)
    im.putpixel((0, 0), 1)
    im.putpixel((1, 0), 2)
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" not in check.info
    t = load_image(tmp_path / "p.png")
    _assert_rgb_tensor(t, 1, 2)
    _assert_rgb(t, 0, 0, (255, 0, 0))
    _assert_rgb(t, 1, 0, (12, 34, 56))


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_P_with_transparency_index_becomes_white(tmp_path: Path, suffix: str) -> None:
    im = Image.new("P", (2, 1))
    pal = [0, 0, 0] * 256
    pal[3:6] = [0, 0, 255]
    pal[6:9] = [0, 0, 0]  # the transparent entry is black: must come out white
    im.putpalette(pal)
    im.putpixel((0, 0), 1)
    im.putpixel((1, 0), 2)
    path = tmp_path / f"pt.{suffix}"
    im.save(path, transparency=2)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    t = load_image(path)
    _assert_rgb_tensor(t, 1, 2)
    _assert_rgb(t, 0, 0, (0, 0, 255))
    _assert_rgb(t, 1, 0, (255, 255, 255))


def test_rgba_transparent_pixel_is_composited_to_white(tmp_path: Path) -> None:
    a = np.array([[[10, 200, 30, 255], [0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    t = load_image(tmp_path / "rgba.png")
    _assert_rgb_tensor(t, 1, 4)
    _assert_rgb(t, 0, 0, (10, 200, 30))  # opaque: unchanged
    _assert_rgb(t, 1, 0, (255, 255, 255))  # transparent black -> white
    _assert_rgb(t, 2, 0, (255, 255, 255))  # transparent red -> white, not red
    _assert_rgb(t, 3, 0, (127, 127, 127), tol=1.5 / 255)  # half black over white


def test_cmyk_tiff_becomes_rgb(tmp_path: Path) -> None:
    im = Image.new("CMYK", (4, 1))
    im.putpixel((0, 0), (0, 0, 0, 0))  # white
    im.putpixel((1, 0), (0, 0, 0, 255))  # black
    im.putpixel((2, 0), (0, 255, 255, 0))  # red
    im.putpixel((3, 0), (255, 0, 255, 0))  # green
    im.save(tmp_path / "cmyk.tiff")
    with Image.open(tmp_path / "cmyk.tiff") as check:
        assert check.mode == "CMYK"
    t = load_image(tmp_path / "cmyk.tiff")
    _assert_rgb_tensor(t, 1, 4)
    _assert_rgb(t, 0, 0, (255, 255, 255))
    _assert_rgb(t, 1, 0, (0, 0, 0))
    _assert_rgb(t, 2, 0, (255, 0, 0))
    _assert_rgb(t, 3, 0, (0, 255, 0))


def test_cmyk_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as check:
        assert check.mode == "CMYK"
    t = load_image(tmp_path / "cmyk.jpg")
    _assert_rgb_tensor(t, 16, 16)
    assert float(t.min()) > 0.95  # zero ink is white


def test_one_bit_image_becomes_black_and_white(tmp_path: Path) -> None:
    im = Image.new("1", (2, 1))
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.save(tmp_path / "bw.png")
    with Image.open(tmp_path / "bw.png") as check:
        assert check.mode == "1"
    t = load_image(tmp_path / "bw.png")
    _assert_rgb_tensor(t, 1, 2)
    _assert_rgb(t, 0, 0, (0, 0, 0), tol=0)
    _assert_rgb(t, 1, 0, (255, 255, 255), tol=0)


def test_16bit_grey_png_keeps_precision_beyond_8_bits(tmp_path: Path) -> None:
    a = np.array([[1000, 1001], [65535, 0]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as check:
        assert check.mode.startswith("I")
    t = load_image(tmp_path / "i16.png")
    _assert_rgb_tensor(t, 2, 2)
    assert torch.equal(t[0], t[1]) and torch.equal(t[0], t[2])
    # Through 8 bits, 1000/65535 would become 4/255 (off by 4e-4) and 1000 == 1001.
    assert abs(float(t[0, 0, 0]) - 1000 / 65535) < 1e-6
    assert abs(float(t[0, 0, 1]) - 1001 / 65535) < 1e-6
    assert float(t[0, 0, 1]) > float(t[0, 0, 0])
    assert float(t[0, 1, 0]) == 1.0 and float(t[0, 1, 1]) == 0.0


def _orientation_test_image() -> Image.Image:
    # Stored 48x32: the top-left 16x16 block is red, the rest green.
    a = np.zeros((32, 48, 3), dtype=np.uint8)
    a[:, :] = (0, 255, 0)
    a[:16, :16] = (255, 0, 0)
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_exif_orientation_6_is_rotated_clockwise(tmp_path: Path, suffix: str) -> None:
    im = _orientation_test_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / f"rot.{suffix}"
    im.save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    t = load_image(path)
    _assert_rgb_tensor(t, 48, 32)  # width/height swapped
    tol = 12 / 255 if suffix == "jpg" else TOL
    # The stored top-left block is now top-right (not top-left: that is a transpose; not bottom-left: CCW).
    _assert_rgb(t, 24, 8, (255, 0, 0), tol)
    _assert_rgb(t, 8, 8, (0, 255, 0), tol)
    _assert_rgb(t, 24, 40, (0, 255, 0), tol)
    _assert_rgb(t, 8, 40, (0, 255, 0), tol)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB", "P", "CMYK"])
def test_a_turned_uncompressed_tiff_is_turned_not_scrambled(tmp_path: Path, mode: str, orientation: int) -> None:
    # Pillow 13 turns a TIFF by its tag on load, and scrambled uncompressed grey, RGBA, palette and CMYK ones turned 5-8.
    from ultrastyle.io.images import _orient

    rng = np.random.default_rng(orientation)
    stored = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    if mode == "L":
        stored[:] = stored[..., :1]
    exif = Image.Exif()
    exif[0x0112] = orientation
    pil = Image.fromarray(stored, "RGB").convert(mode)
    pil.save(tmp_path / "t.tif", exif=exif)
    got = read_image(tmp_path / "t.tif")
    assert np.array_equal(got, _orient(np.asarray(pil.convert("RGB")), orientation)), (mode, orientation)
    if mode == "L":  # a mask's reading keeps grey as (H, W)
        labels = read_image(tmp_path / "t.tif", keep_alpha=True)
        assert np.array_equal(labels, _orient(stored[..., :1], orientation)[..., 0]), orientation


def test_image_without_exif_is_not_rotated(tmp_path: Path) -> None:
    _orientation_test_image().save(tmp_path / "plain.png")
    t = load_image(tmp_path / "plain.png")
    _assert_rgb_tensor(t, 32, 48)
    _assert_rgb(t, 8, 8, (255, 0, 0))


# ---------------------------------------------------------------- bad files


def _assert_image_error(path: Path, *cause_words: str) -> ImageError:
    with pytest.raises(ImageError) as ei:
        load_image(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert any(w in msg.lower() for w in cause_words), msg
    assert "\n" not in msg  # one line
    return ei.value


def test_missing_file_raises_image_error_naming_it(tmp_path: Path) -> None:
    _assert_image_error(tmp_path / "nope.jpg", "no such file")


def test_directory_raises_image_error(tmp_path: Path) -> None:
    d = tmp_path / "folder.png"
    d.mkdir()
    _assert_image_error(d, "directory")


def test_zero_byte_file_raises_image_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    _assert_image_error(p, "empty", "0 bytes")


def test_text_file_named_jpg_raises_image_error(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a JPEG\n" * 20)
    _assert_image_error(p, "not an image")


def test_truncated_jpeg_raises_image_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    err = _assert_image_error(p, "truncated", "corrupt")
    assert isinstance(err.__cause__, OSError)


def _zero_width_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)  # width 0, height 5, 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_zero_size_png_raises_image_error(tmp_path: Path) -> None:
    p = tmp_path / "zero.png"
    p.write_bytes(_zero_width_png())
    _assert_image_error(p, "zero-size", "not an image", "corrupt")


def test_zero_size_image_from_decoder_raises_zero_size_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL refuses 0-pixel files of the common formats itself; a decoder that
    # does report 0xN must still give the zero-size message.
    p = tmp_path / "z.png"
    p.write_bytes(b"placeholder")
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: Image.new("RGB", (0, 3)))
    _assert_image_error(p, "zero-size")


def test_permission_denied_raises_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod 000 does not block reading: simulate it.
    p = tmp_path / "locked.png"
    Image.new("RGB", (2, 2)).save(p)

    def deny(fp: object, *a: object, **k: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(PIL.Image, "open", deny)
    err = _assert_image_error(p, "permission denied")
    assert isinstance(err.__cause__, PermissionError)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------- max_pixels


def test_image_above_max_pixels_is_refused_with_hint(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(p)  # 200 px
    for limit in (199, 150, 100, 50):  # just above and far above PIL's own warning/error thresholds
        with pytest.raises(ImageError) as ei:
            load_image(p, max_pixels=limit)
        msg = str(ei.value)
        # one limit, one message, naming the keyword (the CLI shows it as its flag)
        assert str(p) in msg and f"20x10 = 200 pixels is above the limit of {limit} pixels (max_pixels)" in msg, (limit, msg)
    _assert_rgb_tensor(load_image(p, max_pixels=200), 10, 20)


def test_max_pixels_overrides_pil_bomb_guard_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(p)  # 200 px
    # Pretend PIL's default guard (89 MP) is below this image, even below half of it.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(p)  # PIL alone refuses it
    t = load_image(p, max_pixels=1000)
    _assert_rgb_tensor(t, 10, 20)
    assert PIL.Image.MAX_IMAGE_PIXELS == 50  # restored after success
    with pytest.raises(ImageError):
        load_image(p, max_pixels=100)
    assert PIL.Image.MAX_IMAGE_PIXELS == 50  # restored after failure


def test_default_max_pixels_allows_more_than_pil_default() -> None:
    from ultrastyle.io.images import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS > 89_478_485


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize(("h", "w", "size", "expected"), [(40, 60, 30, (20, 30)), (60, 40, 30, (30, 20)), (37, 45, 90, (74, 90))])
def test_resize_long_side_makes_long_side_exact(h: int, w: int, size: int, expected: tuple[int, int]) -> None:
    img = torch.rand(3, h, w)
    out = resize_long_side(img, size)
    assert tuple(out.shape) == (3, *expected)
    assert max(out.shape[-2:]) == size
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_resize_long_side_zero_or_same_size_keeps_image() -> None:
    img = torch.rand(3, 37, 45)
    assert resize_long_side(img, 0) is img
    assert torch.equal(resize_long_side(img, 45), img)


def test_resize_long_side_keeps_constant_colour() -> None:
    img = torch.full((3, 50, 80), 0.25)
    out = resize_long_side(img, 16)
    assert tuple(out.shape) == (3, 10, 16)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-5)


# ---------------------------------------------------------------- save


def _u8_image(h: int = 9, w: int = 13, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
    return torch.from_numpy(a).float() / 255.0


def test_save_png_round_trip_is_exact(tmp_path: Path) -> None:
    img = _u8_image()
    out = save_image(img, tmp_path / "o.png", "png")
    assert out == tmp_path / "o.png"
    with Image.open(out) as check:
        assert check.format == "PNG" and check.mode == "RGB" and check.size == (13, 9)
    back = load_image(out)
    assert torch.equal((back * 255).round(), (img * 255).round())
    assert _partials(tmp_path) == []


def test_save_tiff_round_trip_is_exact(tmp_path: Path) -> None:
    img = _u8_image(seed=1)
    out = save_image(img, tmp_path / "o.tiff", "tiff")
    with Image.open(out) as check:
        assert check.format == "TIFF" and check.size == (13, 9)
    assert torch.equal((load_image(out) * 255).round(), (img * 255).round())


def test_save_jpg_round_trip_is_close(tmp_path: Path) -> None:
    img = torch.zeros(3, 32, 48)
    img[0, :, :24] = 1.0  # red left half
    img[2, :, 24:] = 0.5  # dark blue right half
    out = save_image(img, tmp_path / "o.jpg", "jpg")
    with Image.open(out) as check:
        assert check.format == "JPEG" and check.size == (48, 32)
    back = load_image(out)
    assert (back - img).abs().mean() < 4 / 255
    _assert_rgb(back, 8, 16, (255, 0, 0), tol=10 / 255)


def test_save_clamps_out_of_range_values(tmp_path: Path) -> None:
    img = torch.tensor([[[-0.5, 1.7]], [[0.0, 1.0]], [[2.0, -3.0]]])
    back = load_image(save_image(img, tmp_path / "c.png"))
    assert torch.equal(back, torch.tensor([[[0.0, 1.0]], [[0.0, 1.0]], [[1.0, 0.0]]]))


def test_save_unknown_format_raises(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="format"):
        save_image(_u8_image(), tmp_path / "o.bmp", "bmp")
    assert list(tmp_path.iterdir()) == []


def test_save_creates_missing_output_folders(tmp_path: Path) -> None:
    out = save_image(_u8_image(), tmp_path / "a" / "b" / "o.png")
    assert out.is_file()


def test_save_overwrites_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "o.png"
    target.write_bytes(b"old")
    save_image(_u8_image(), target)
    with Image.open(target) as check:
        assert check.format == "PNG"
    assert _partials(tmp_path) == []


def test_save_under_a_regular_file_raises_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker / "sub" / "o.png"
    with pytest.raises(ImageError) as ei:
        save_image(_u8_image(), target)
    msg = str(ei.value)
    assert str(blocker) in msg and ("cannot write" in msg or "directory" in msg), msg
    assert _partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blocker"]
    assert blocker.read_text() == "a file, not a folder"


def test_save_failing_midway_leaves_no_target_and_no_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    import ultrastyle.io.images as images

    def broken_encode(a: object, fp: object, *args: object) -> None:  # the encoder's writes fail midway
        calls.append(fp)
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images, "_encode", broken_encode)
    target = tmp_path / "o.png"
    with pytest.raises(ImageError) as ei:
        save_image(_u8_image(), target)
    assert calls, "the patched save was not used"
    assert str(target) in str(ei.value) and "No space left" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


_SHORT_WRITE = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from ultrastyle.io.images import ImageError, save_array
from ultrastyle.io.pyramid import _write_tile
# A write that crosses the size limit is short, as one that fills a disk is; past it, writes fail (EFBIG).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
a = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
out = Path(sys.argv[1])
for fmt in ("jpg", "tiff", "png"):
    try:
        save_array(a, out / f"o.{fmt}", fmt)
        print(fmt, "written")
    except ImageError as exc:
        print(fmt, "refused", exc)
try:
    _write_tile(a, out / "t.jpeg", "jpeg", 90)
    print("tile written")
except OSError as exc:
    print("tile refused", exc)
from PIL import Image
from ultrastyle.io.images import pil_save
try:  # an open file: Pillow's JPEG encoder wrote to its descriptor and ignored the short write
    with open(out / "direct.jpg", "wb") as f:
        pil_save(Image.fromarray(a), f, "JPEG")
    print("direct written")
except OSError as exc:
    print("direct refused", exc)
"""


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
def test_a_full_disk_fails_the_write_rather_than_leaving_a_truncated_jpeg(tmp_path: Path) -> None:
    # Pillow's C encoders wrote to the descriptor and ignored a short write: a JPEG cut at the disk's end, "done".
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    said = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    for fmt in ("jpg", "tiff", "png"):
        assert said[fmt].startswith("refused") and f"o.{fmt}: cannot write the image" in said[fmt], r.stdout
    assert said["tile"].startswith("refused") and said["direct"].startswith("refused"), r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.jpg", "t.jpeg"]  # the callers' own files; no image


def test_save_interrupted_midway_reraises_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        fp.write(b"partial bytes")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(ultrastyle.io.images, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(_u8_image(), tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_target_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "o.png"
    save_image(_u8_image(seed=3), target)
    before = target.read_bytes()

    def broken_save(self: Image.Image, fp: object, *a: object, **k: object) -> None:
        fp.write(b"garbage")  # type: ignore[attr-defined]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ultrastyle.io.images, "_encode", broken_save)
    with pytest.raises(ImageError):
        save_image(_u8_image(seed=4), target)
    assert target.read_bytes() == before
    assert _partials(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_file_mode_honours_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = save_image(_u8_image(), tmp_path / "o.png")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == 0o666 & ~umask, oct(mode)
    assert mode != 0o600


# ---------------------------------------------------------------- expand_inputs


def _touch_images(d: Path, *names: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        (d / n).write_bytes(b"x")


def test_expand_directory_gives_sorted_image_files_only(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    _touch_images(d, "c.webp", "a.png", "b.JPG", "notes.txt", "model.pth", "d.tiff", "._a.png", ".hidden.jpg", "png")  # macOS forks
    (d / "sub.png").mkdir()  # a folder with an image suffix is not a file
    _touch_images(d / "nested", "e.png")  # no recursion
    assert expand_inputs([d]) == [d / "a.png", d / "b.JPG", d / "c.webp", d / "d.tiff"]
    assert expand_inputs([d / "._a.png"]) == [d / "._a.png"]  # named: taken as given (and failed as no image)


def test_expand_glob_gives_sorted_matches(tmp_path: Path) -> None:
    _touch_images(tmp_path, "b.png", "a.png", "c.jpg")
    assert expand_inputs([str(tmp_path / "*.png")]) == [tmp_path / "a.png", tmp_path / "b.png"]
    assert expand_inputs([str(tmp_path / "?.jpg")]) == [tmp_path / "c.jpg"]


def test_expand_keeps_missing_path_and_unmatched_glob(tmp_path: Path) -> None:
    _touch_images(tmp_path, "a.png")
    missing = tmp_path / "missing.jpg"
    unmatched = str(tmp_path / "*.gif")
    assert expand_inputs([str(missing), unmatched, str(tmp_path / "a.png")]) == [
        missing,
        Path(unmatched),
        tmp_path / "a.png",
    ]


def test_expand_keeps_explicit_file_whatever_its_suffix(tmp_path: Path) -> None:
    _touch_images(tmp_path, "photo.raw")
    assert expand_inputs([tmp_path / "photo.raw"]) == [tmp_path / "photo.raw"]


def test_expand_drops_duplicates_keeping_first_order(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    _touch_images(d, "a.png", "b.png")
    got = expand_inputs([str(d / "b.png"), str(d), str(d / "*.png"), str(d / "a.png")])
    assert got == [d / "b.png", d / "a.png"]


def test_expand_drops_one_file_written_two_ways(tmp_path: Path, monkeypatch) -> None:
    _touch_images(tmp_path, "a.png")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["a.png", str(tmp_path / "a.png"), "./a.png"]) == [Path("a.png")]
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")  # another name, another output: kept
    assert expand_inputs(["a.png", "link.png"]) == [Path("a.png"), Path("link.png")]
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "up").symlink_to(tmp_path / "deep" / "sub")
    _touch_images(tmp_path / "deep", "a.png")  # up/../a.png is deep/a.png, which ".." taken as text would merge with a.png
    assert expand_inputs(["a.png", "up/../a.png", "deep/a.png"]) == [Path("a.png"), Path("up/../a.png")]


def test_expand_empty_directory_gives_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert expand_inputs([tmp_path / "empty"]) == []


@pytest.mark.parametrize("orientation", range(1, 9))
def test_numpy_orientation_matches_pil_exif_transpose(orientation):
    from PIL import ImageOps

    from ultrastyle.io.images import _orient

    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    img = Image.fromarray(a, "RGB")
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    ref = np.asarray(ImageOps.exif_transpose(img))
    assert np.array_equal(_orient(a, orientation), ref)


def test_tiffs_pillow_cannot_open_are_read_through_tifffile(tmp_path):
    """Float RGB samples and 16-bit planes stored one after another: pixels, not "corrupt"."""
    import tifffile

    from ultrastyle.io.images import read_image

    rgb = np.random.default_rng(0).random((12, 16, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f32.tif", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "f32.tif"), rgb)
    planes = np.random.default_rng(1).integers(0, 65536, (3, 12, 16)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", planes, planarconfig="separate", photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), np.moveaxis(planes, 0, -1))
    with pytest.raises(ImageError, match=r"above the limit of 100 pixels \(max_pixels\)"):  # the limit, not "corrupt"
        read_image(tmp_path / "f32.tif", max_pixels=100)
    (tmp_path / "cut.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageError, match="truncated or corrupt TIFF file"):
        read_image(tmp_path / "cut.tif")


def test_a_pipe_is_refused_as_one_not_as_an_empty_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fd63"
    os.mkfifo(fifo)  # what `<(cat photo.jpg)` gives: its size reads 0, and it can be read only once
    with pytest.raises(ImageError, match="fd63: not a regular file"):
        read_image(fifo)


def test_tiff_files_beyond_pillow_are_read_as_their_tags_and_samples_say(tmp_path):
    """A user review: float TIFFs ignored their orientation, out-of-range samples became white without a word, grey + alpha
    PNGs lost 8 bits, other pages were dropped silently, and a WebP TIFF was "corrupt"."""
    import imagecodecs
    import tifffile

    from ultrastyle.io.images import AnimatedImageWarning

    rng = np.random.default_rng(0)
    rgb = rng.random((40, 60, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "turned.tif", rgb, photometric="rgb", extratags=[(274, "H", 1, 6, True)])  # EXIF 6: 90° clockwise
    np.testing.assert_array_equal(read_image(tmp_path / "turned.tif"), np.rot90(rgb, -1))
    tifffile.imwrite(tmp_path / "f255.tif", rgb * 255, photometric="rgb")
    with pytest.raises(ImageError, match=r"f255.tif: float samples must lie in \[0, 1\], got .*; divide 0..255 data by 255"):
        read_image(tmp_path / "f255.tif")
    tifffile.imwrite(tmp_path / "over.tif", rgb * 1.03 - 0.01, photometric="rgb")  # resampling's overshoot: clipped, not refused
    np.testing.assert_array_equal(read_image(tmp_path / "over.tif"), np.clip(rgb * 1.03 - 0.01, 0, 1))
    tifffile.imwrite(tmp_path / "i32.tif", (rng.random((40, 60)) * 255000).astype(np.int32))
    with pytest.raises(ImageError, match="i32.tif: 32-bit integer samples .* do not fit 16 bits"):
        read_image(tmp_path / "i32.tif")
    ramp = np.stack([np.tile(np.arange(60, dtype=np.uint16) * 1001, (40, 1)), np.full((40, 60), 65535, np.uint16)], -1)
    (tmp_path / "la16.png").write_bytes(imagecodecs.png_encode(ramp))  # opaque 16-bit grey + alpha
    got = read_image(tmp_path / "la16.png")
    assert got.dtype == np.uint16 and np.array_equal(got, np.repeat(ramp[..., :1], 3, axis=2))
    pages = (rng.random((2, 40, 60, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="rgb")
    with pytest.warns(AnimatedImageWarning, match="pages.tif: a TIFF of 2 pages; its first page is used"):
        assert np.array_equal(read_image(tmp_path / "pages.tif"), pages[0])
    deep = pages.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "pages16.tif", deep, photometric="rgb")  # the 16-bit path too
    with pytest.warns(AnimatedImageWarning, match="pages16.tif: a TIFF of 2 pages"):
        assert np.array_equal(read_image(tmp_path / "pages16.tif"), deep[0])
    with pytest.raises(ImageError, match=r"nothing\*.png: no file matches this pattern"):
        read_image(tmp_path / "nothing*.png")
    if imagecodecs.WEBP.available:
        tifffile.imwrite(tmp_path / "webp.tif", pages[0], photometric="rgb", compression="webp", compressionargs={"level": 100, "lossless": True})
        assert np.array_equal(read_image(tmp_path / "webp.tif"), pages[0])  # tifffile's codec where Pillow's libtiff has none
