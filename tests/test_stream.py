"""io.stream: content files read a band at a time equal the whole read, and hostile files fail alone."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ultrastyle.io.images import AnimatedImageWarning, ImageError, read_image, resize_long_side

pyvips = pytest.importorskip("pyvips", reason="streaming reads need pyvips (pip install 'ultrastyle[vips]')")

from ultrastyle.io.stream import open_stream, stream_blocker  # noqa: E402
from ultrastyle.runtime.batch import StylizeOptions  # noqa: E402
from ultrastyle.runtime.decode import ReadWholeWarning, StreamedDecoded, decode, load_content, read_plan  # noqa: E402

H, W = 61, 83


def _streamed(path: Path, rows: int = 17, content_size: int = 0, max_pixels: int = 10**9) -> np.ndarray:
    s = open_stream(path, max_pixels=max_pixels, content_size=content_size)
    bands = list(s.bands(rows))
    assert [r0 for r0, _ in bands] == sorted({r0 for r0, _ in bands}) and bands[0][0] == 0
    out = np.concatenate([b for _, b in bands])
    assert out.shape == (*s.size, 3) and out.dtype == s.dtype
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import imagecodecs
    import tifffile

    d = tmp_path_factory.mktemp("modes")
    rng = np.random.default_rng(0)
    a = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    alpha = (rng.random((H, W)) * 255).astype(np.uint8)
    a16 = (rng.random((H, W, 3)) * 65535).astype(np.uint16)
    g16 = (rng.random((H, W)) * 65535).astype(np.uint16)
    im = Image.fromarray(a)
    out = {}

    def put(name: str, save) -> None:
        out[name] = d / name
        save(out[name])

    put("rgb.png", lambda p: im.save(p))
    put("rgb.jpg", lambda p: im.save(p, quality=90))
    put("progressive.jpg", lambda p: im.save(p, quality=90, progressive=True))
    put("rgb.tif", lambda p: im.save(p, compression="tiff_deflate"))
    put("rgb.webp", lambda p: im.save(p, lossless=True))
    put("grey.png", lambda p: im.convert("L").save(p))
    put("grey.jpg", lambda p: im.convert("L").save(p))
    put("palette.png", lambda p: im.convert("P").save(p))
    put("cmyk.jpg", lambda p: im.convert("CMYK").save(p))
    put("cmyk.tif", lambda p: im.convert("CMYK").save(p))
    put("rgba.png", lambda p: Image.fromarray(np.dstack([a, alpha])).save(p))
    put("rgba.webp", lambda p: Image.fromarray(np.dstack([a, alpha])).save(p, lossless=True))
    put("la.png", lambda p: Image.fromarray(np.dstack([a[..., 0], alpha]), "LA").save(p))
    put("rgb16.png", lambda p: p.write_bytes(imagecodecs.png_encode(a16)))
    put("rgb16.tif", lambda p: tifffile.imwrite(p, a16, photometric="rgb"))
    put("rgba16.png", lambda p: p.write_bytes(imagecodecs.png_encode(np.dstack([a16, g16]))))
    put("grey16.png", lambda p: Image.fromarray(g16).save(p))
    put("grey16.tif", lambda p: tifffile.imwrite(p, g16))
    return out


@pytest.mark.parametrize("name", [
    "rgb.png", "rgb.jpg", "progressive.jpg", "rgb.tif", "rgb.webp", "grey.png", "grey.jpg", "palette.png", "cmyk.jpg",
    "cmyk.tif", "rgba.png", "rgba.webp", "la.png", "rgb16.png", "rgb16.tif", "rgba16.png", "grey16.png", "grey16.tif",
])  # fmt: skip
def test_streamed_read_equals_whole_read(files: dict[str, Path], name: str) -> None:
    assert stream_blocker(files[name]) is None
    whole = read_image(files[name])
    streamed = _streamed(files[name])
    assert streamed.dtype == whole.dtype  # 16-bit files keep their precision
    np.testing.assert_array_equal(streamed, whole)


@pytest.mark.parametrize("name", ["rgb.jpg", "rgb16.png", "cmyk.jpg"])
@pytest.mark.parametrize("size", [40, 150])
def test_streamed_resize_equals_whole_resize(files: dict[str, Path], name: str, size: int) -> None:
    options = StylizeOptions(content_size=size)
    whole, original = load_content(files[name], options)
    streamed = _streamed(files[name], rows=13, content_size=size)
    assert original == (H, W) and streamed.shape == whole.shape and streamed.dtype == np.float32
    err = np.abs(streamed - whole)
    assert err.max() <= 3e-5, err.max()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_files_are_read_whole_and_say_why(tmp_path: Path, orientation: int) -> None:
    p = tmp_path / f"o{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray((np.random.default_rng(1).random((H, W, 3)) * 255).astype(np.uint8)).save(p, exif=exif)
    assert "orientation" in (stream_blocker(p) or "")
    options = StylizeOptions(streaming="always")
    with pytest.warns(ReadWholeWarning, match="orientation") as caught:
        d = decode(p, options)
    assert "streaming was asked for" in str(caught[0].message) and "above the" not in str(caught[0].message)  # small: not a budget matter
    assert not isinstance(d, StreamedDecoded)
    np.testing.assert_array_equal(d.take(), read_image(p))  # turned as EXIF says, by the whole reader


def test_interlaced_png_is_read_whole(tmp_path: Path) -> None:
    p = tmp_path / "adam7.png"
    pyvips.Image.new_from_array((np.random.default_rng(2).random((H, W, 3)) * 255).astype(np.uint8)).pngsave(str(p), interlace=True)
    assert "interlaced" in (stream_blocker(p) or "")
    with pytest.warns(ReadWholeWarning, match="interlaced") as caught:
        d = decode(p, StylizeOptions(streaming="always"))
    assert "streaming was asked for" in str(caught[0].message)
    assert not isinstance(d, StreamedDecoded)
    np.testing.assert_array_equal(d.take(), read_image(p))


def test_auto_streams_only_what_does_not_fit(files: dict[str, Path]) -> None:
    p = files["rgb.png"]
    assert read_plan(p, StylizeOptions())[0] is False  # 15 kB fits the default allowance
    stream, nbytes, why = read_plan(p, StylizeOptions(io_memory=1000))
    assert stream and why is None and nbytes > 0
    assert isinstance(decode(p, StylizeOptions(io_memory=1000)), StreamedDecoded)
    assert read_plan(p, StylizeOptions(io_memory=1000, streaming="never"))[0] is False


def test_streamed_canvas_equals_whole_canvas(files: dict[str, Path]) -> None:
    from ultrastyle.core.canvas import CanvasSite

    for size in (0, 50):
        a = decode(files["rgb16.png"], StylizeOptions(streaming="never", content_size=size)).to_canvas(CanvasSite())
        b = decode(files["rgb16.png"], StylizeOptions(streaming="always", content_size=size)).to_canvas(CanvasSite())
        tol = 0 if size == 0 else 3e-5
        assert np.abs(a.numpy() - b.numpy()).max() <= tol


def test_header_over_max_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    # A JPEG whose header claims 30000 x 30000 (900 MP): its data is not even there.
    p = tmp_path / "huge.jpg"
    Image.new("RGB", (8, 8)).save(p)
    raw = bytearray(p.read_bytes())
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") + (30000).to_bytes(2, "big")
    p.write_bytes(bytes(raw))
    with pytest.raises(ImageError) as ei:
        open_stream(p, max_pixels=400_000_000)
    assert str(ei.value) == f"{p}: 30000x30000 = 900 MP is above the limit of 400 MP (max_pixels); raise the limit to read it"
    with pytest.raises(ImageError) as ej:
        read_image(p, max_pixels=400_000_000)
    assert str(ej.value) == str(ei.value)  # one limit, one message, whichever reader


@pytest.mark.parametrize("name", ["rgb.jpg", "rgb.tif", "rgb.png", "rgb16.tif", "rgb16.png", "rgb.webp"])
@pytest.mark.parametrize("reader", ["stream", "whole"])
def test_truncated_files_fail_with_one_error(files: dict[str, Path], tmp_path: Path, name: str, reader: str) -> None:
    data = files[name].read_bytes()
    p = tmp_path / f"cut_{name}"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageError) as ei, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own warnings about the damaged TIFF directory
        _streamed(p) if reader == "stream" else read_image(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: ") and "\n" not in msg and ("truncated" in msg or "corrupt" in msg), msg


def test_animation_uses_its_first_frame_and_says_so(tmp_path: Path) -> None:
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (W, H), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    with pytest.warns(AnimatedImageWarning, match="3 frames; its first frame is used"):
        whole = read_image(p)
    with pytest.warns(AnimatedImageWarning, match="3 frames"):
        streamed = _streamed(p)
    np.testing.assert_array_equal(streamed, whole)
    assert tuple(whole[0, 0]) == (200, 10, 10)


def test_batch_outputs_equal_with_and_without_streaming(files: dict[str, Path], cd16x_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ultrastyle

    streamed = []
    original = StreamedDecoded.to_canvas
    monkeypatch.setattr(StreamedDecoded, "to_canvas", lambda self, site: streamed.append(self.stream.path) or original(self, site))

    style = Image.fromarray((np.random.default_rng(3).random((40, 40, 3)) * 255).astype(np.uint8))
    st = ultrastyle.load(str(cd16x_dir), backend="torch")
    outs = {}
    for mode in ("never", "always"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ReadWholeWarning)
            outs[mode] = st.stylize(files["cmyk.jpg"], style, streaming=mode, levels="5,1", max_memory="64MB", style_size=40)
    assert streamed == [files["cmyk.jpg"]]  # "always" streamed, "never" did not (the style, at its own size, has nothing to resize)
    np.testing.assert_array_equal(outs["never"], outs["always"])
    ref = resize_long_side(torch.zeros(3, H, W), 0)
    assert outs["always"].shape == (ref.shape[1], ref.shape[2], 3)


def test_cli_streams_and_says_which_files_it_reads_whole(files: dict[str, Path], tmp_path: Path, cd16x_dir: Path) -> None:
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(files["rgb.jpg"]).save(rotated, exif=exif)
    style = tmp_path / "style.png"
    Image.fromarray((np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)).save(style)
    out = tmp_path / "out"
    argv = ["stylize", str(files["rgb16.png"]), str(rotated), "--style", str(style), "-o", str(out), "--model", str(cd16x_dir),
            "--backend", "torch", "--levels", "5,1", "--streaming", "always", "--style-size", "32"]  # fmt: skip
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and str(rotated) in lines[0] and "orientation" in lines[0], r.output
    assert (out / "rgb16_stylized_style.png").is_file() and (out / "rotated_stylized_style.png").is_file()
    assert Image.open(out / "rotated_stylized_style.png").size == (H, W)  # turned by its EXIF orientation


def test_tiffs_libvips_may_not_decode_are_read_whole_and_floats_outside_unit_range_are_refused(tmp_path):
    """A user review: a zstd TIFF streamed as rows of zeros (a flat output, "done"), 0..255 floats streamed as white,
    and a second page was dropped without the warning a whole read gives."""
    import tifffile

    rng = np.random.default_rng(0)
    rgb = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "zstd.tif", rgb, photometric="rgb", compression="zstd")
    assert "TIFF compression (50000)" in (stream_blocker(tmp_path / "zstd.tif") or "")
    assert np.array_equal(read_image(tmp_path / "zstd.tif"), rgb)  # where it goes instead
    tifffile.imwrite(tmp_path / "lzw.tif", rgb, photometric="rgb", compression="lzw")
    assert stream_blocker(tmp_path / "lzw.tif") is None and np.array_equal(_streamed(tmp_path / "lzw.tif"), rgb)
    tifffile.imwrite(tmp_path / "f255.tif", rgb.astype(np.float32), photometric="rgb")
    assert stream_blocker(tmp_path / "f255.tif") is None
    with pytest.raises(ImageError, match=r"f255.tif: float samples must lie in \[0, 1\]"):
        _streamed(tmp_path / "f255.tif")
    tifffile.imwrite(tmp_path / "pages.tif", np.stack([rgb, rgb[::-1]]), photometric="rgb")
    with pytest.warns(AnimatedImageWarning, match="a TIFF of 2 pages; its first page is used"):
        open_stream(tmp_path / "pages.tif", max_pixels=10**9)


@pytest.mark.parametrize("fmt", ["webp", "png", "jpg"])
def test_a_file_replaced_at_the_same_path_is_read_anew(tmp_path: Path, fmt: str) -> None:
    """A service's upload slot: libvips' operation cache gave the earlier file's pixels for a WebP written at the same
    path, and held the descriptors of deleted files."""
    rng = np.random.default_rng(5)
    slot = tmp_path / f"upload.{fmt}"
    read = []
    for k in range(2):
        if slot.exists():
            slot.unlink()
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(slot, **({"lossless": True} if fmt == "webp" else {}))
        assert stream_blocker(slot) is None
        stream = open_stream(slot, max_pixels=10**6)
        got = np.concatenate([band for _, band in stream.bands()], axis=0)
        np.testing.assert_array_equal(got, read_image(slot), err_msg=f"upload {k}")
        read.append(got)
    assert not np.array_equal(read[0], read[1])


def test_why_a_file_is_not_streamed_tells_a_missing_pyvips_from_a_libvips_it_cannot_load(tmp_path, monkeypatch):
    """pyvips without pyvips-binary (no system libvips) was reported as "pyvips is not installed"."""
    import importlib.util

    from ultrastyle.io import stream

    monkeypatch.setattr(stream, "vips_available", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "pyvips" else real(name, *a))
    assert stream.stream_blocker(tmp_path / "a.jpg").startswith("pyvips cannot load libvips")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyvips" else real(name, *a))
    assert stream.stream_blocker(tmp_path / "a.jpg") == "pyvips is not installed (pip install 'ultrastyle[vips]')"
