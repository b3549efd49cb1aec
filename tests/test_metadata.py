"""Outputs keep their content file's resolution (scaled with the resize) and EXIF (turned upright, GPS left out unless
asked), in every writer that can hold them; ``metadata="none"`` keeps nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.cli.params import Metadata
from ultrastyle.io.metadata import EXIF_IFD, GPS_IFD, METADATA, ORIENTATION, PIXEL_X, PIXEL_Y, OutputMeta
from ultrastyle.io.pyramid import PyramidOptions, save_output, write_jpeg_bands, write_png_bands
from ultrastyle.io.sources import content_meta

MAKE, ARTIST = 0x010F, 0x013B


def _photo(path: Path, size=(60, 40), dpi=(300, 300), orientation=6, gps=True) -> Path:
    """A camera-like JPEG: stored ``size`` (W, H), turned by ``orientation``, with a make, an artist, pixel dimensions and
    (``gps``) a position."""
    exif = Image.Exif()
    exif[MAKE], exif[ARTIST], exif[ORIENTATION] = "Camera Co", "A. Photographer", orientation
    exif.get_ifd(EXIF_IFD).update({PIXEL_X: size[0], PIXEL_Y: size[1]})
    if gps:
        exif.get_ifd(GPS_IFD).update({1: "N", 2: (48.0, 51.0, 24.0)})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, dpi=dpi, exif=exif, quality=95)
    return path


def _read(path: Path) -> tuple[tuple[float, float] | None, Image.Exif]:
    with Image.open(path) as img:
        return img.info.get("dpi"), img.getexif()


def test_an_output_keeps_the_content_s_print_size_and_its_exif_upright_without_gps(tmp_path):
    photo = _photo(tmp_path / "p.jpg")  # 60x40 stored, shown 40x60 (orientation 6)
    meta = content_meta(photo, 120, 80, "keep")  # the output: 80 wide, 120 high (twice the shown size)
    assert meta is not None and meta.dpi == pytest.approx((600.0, 600.0))  # twice the pixels, the same inches
    exif = Image.Exif()
    exif.load(meta.exif)
    assert exif[ORIENTATION] == 1 and exif[MAKE] == "Camera Co" and exif[ARTIST] == "A. Photographer"
    assert GPS_IFD not in exif and not exif.get_ifd(GPS_IFD)
    assert dict(exif.get_ifd(EXIF_IFD))[PIXEL_X] == 80 and dict(exif.get_ifd(EXIF_IFD))[PIXEL_Y] == 120
    assert float(exif[0x011A]) == pytest.approx(600.0)  # IFD0's resolution too (libvips prefers it to JFIF's)
    everything = content_meta(photo, 120, 80, "all")
    assert everything is not None
    exif.load(everything.exif)
    assert exif.get_ifd(GPS_IFD)[1] == "N"
    assert content_meta(photo, 120, 80, "none") is None
    flat = tmp_path / "flat.png"
    Image.new("RGB", (8, 8)).save(flat)
    assert content_meta(flat, 8, 8) is None  # nothing to keep
    assert content_meta(np.zeros((8, 8, 3), np.uint8), 8, 8) is None  # type: ignore[arg-type]  # in memory: none
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert content_meta(tmp_path / "bad.jpg", 8, 8) is None  # the read reports the file, not this
    with pytest.raises(ValueError, match="keep, all, none"):
        content_meta(photo, 8, 8, "some")
    assert tuple(m.value for m in Metadata) == METADATA  # the command line's spelling of the same choices


def test_a_tiff_content_gives_its_descriptive_tags_not_its_layout_profile_or_form(tmp_path):
    """A TIFF's first directory is its whole layout: strip offsets, bits per sample, its ICC profile. The output's EXIF
    keeps the make and artist, in classic TIFF form, with the resolution scaled."""
    exif = Image.Exif()
    exif[MAKE], exif[ARTIST] = "Scanner Co", "A. Scanner"
    tif = tmp_path / "scan.tif"
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tif, exif=exif, dpi=(600, 600), icc_profile=b"\0" * 128)
    meta = content_meta(tif, 10, 20, "keep")  # half the pixels
    assert meta is not None and meta.dpi == pytest.approx((300.0, 300.0))
    out = Image.Exif()
    out.load(meta.exif)
    assert meta.exif.startswith(b"Exif\0\0II*\0") or meta.exif.startswith(b"Exif\0\0MM\0*")  # classic, not BigTIFF
    assert out[MAKE] == "Scanner Co" and out[ARTIST] == "A. Scanner" and out[ORIENTATION] == 1
    assert not {0x0100, 0x0101, 0x0102, 0x0111, 0x0117, 0x8773} & set(out)  # no layout, no ICC profile


def test_a_png_s_metadata_is_read_without_decoding_it(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    png = tmp_path / "big.png"
    Image.new("RGB", (64, 48)).save(png, dpi=(150, 150))  # no eXIf chunk: Pillow's getexif() would decode the pixels
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    meta = content_meta(png, 96, 128, "keep")
    assert meta is not None and meta.dpi == pytest.approx((300.0, 300.0), abs=0.05) and meta.exif is None  # whole px/m


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
@pytest.mark.parametrize(("unit", "resolution", "expected"), [(2, 300, 600.0), (3, 100, 508.0)])
def test_a_resolution_given_only_in_the_exif_is_kept_and_scaled(fmt, unit, resolution, expected, tmp_path):
    """A camera JPEG without a JFIF density, or a WebP, says its resolution in EXIF alone (Pillow's IFDRationals, which
    were dropped, or no ``dpi`` at all for WebP)."""
    exif = Image.Exif()
    exif[MAKE], exif[0x011A], exif[0x011B], exif[0x0128] = "Camera Co", resolution, resolution, unit
    photo = tmp_path / f"cam.{fmt}"
    Image.new("RGB", (30, 20)).save(photo, exif=exif)
    meta = content_meta(photo, 40, 60, "keep")  # twice the pixels
    assert meta is not None and meta.dpi == pytest.approx((expected, expected))
    out = Image.Exif()
    out.load(meta.exif)
    assert float(out[0x011A]) == pytest.approx(expected) and out[0x0128] == 2  # the EXIF says the output's, in inches


def test_an_exif_resolution_without_a_unit_says_no_size_and_is_not_kept_stale(tmp_path):
    exif = Image.Exif()
    exif[MAKE], exif[0x011A], exif[0x011B], exif[0x0128] = "Camera Co", 300, 300, 1  # 1: no absolute unit
    photo = tmp_path / "cam.webp"
    Image.new("RGB", (30, 20)).save(photo, exif=exif)
    meta = content_meta(photo, 40, 60, "keep")
    assert meta is not None and meta.dpi is None
    out = Image.Exif()
    out.load(meta.exif)
    assert out[MAKE] == "Camera Co" and 0x011A not in out


@pytest.mark.parametrize("writer", ["png", "png-bands", "jpg", "jpg-bands", "tiff", "tiff-pyramid", "tiff-16"])
def test_every_writer_that_can_hold_them_writes_the_resolution_and_exif(writer, tmp_path):
    pytest.importorskip("pyvips", reason="JPEG bands are written by libvips: the vips extra is not installed here")
    meta = content_meta(_photo(tmp_path / "p.jpg"), 96, 64, "keep")
    assert meta is not None
    a = np.random.default_rng(1).integers(0, 255, (96, 64, 3), dtype=np.uint8)
    out = tmp_path / f"o.{writer.split('-')[0]}"
    if writer == "png-bands":
        write_png_bands([a[:50], a[50:]], out, 96, 64, meta=meta)
    elif writer == "jpg-bands":
        write_jpeg_bands([a[:50], a[50:]], out, 96, 64, meta=meta)
    elif writer == "tiff-16":
        save_output(a.astype(np.uint16) * 257, out, "tiff", depth=16, meta=meta)
    else:
        save_output(a, out, writer.split("-")[0], meta=meta, pyramid=PyramidOptions(tiff_layout="pyramid" if "pyramid" in writer else "plain"))
    dpi, exif = _read(out)
    assert dpi == pytest.approx(meta.dpi, abs=0.013)  # PNG keeps whole pixels per metre: within 0.0127 dpi
    if writer.startswith("tiff"):  # TIFF outputs get the resolution alone
        assert MAKE not in exif
    else:
        assert exif[MAKE] == "Camera Co" and exif.get(ORIENTATION) == 1 and GPS_IFD not in exif
    if writer.startswith("png"):  # lossless: the pixels are untouched by the chunks
        np.testing.assert_array_equal(np.asarray(Image.open(out)), a)
    plain = tmp_path / f"plain.{writer.split('-')[0]}"
    save_output(a, plain, writer.split("-")[0], meta=OutputMeta())  # nothing given: nothing written
    assert _read(plain)[0] in (None, (1, 1), (72, 72)) and MAKE not in _read(plain)[1]


def test_the_command_line_keeps_the_content_s_metadata_unless_told(cd16x_dir, tmp_path, one_thread):
    photo = _photo(tmp_path / "p.jpg", size=(48, 32), dpi=(240, 240), orientation=1)
    style = tmp_path / "s.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(style)
    base = ["stylize", str(photo), "--style", str(style), "--model", str(cd16x_dir), "--levels", "5", "--style-size", "40"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "kept"), "--content-size", "24"])
    assert r.exit_code == 0, r.output
    dpi, exif = _read(tmp_path / "kept" / "p_stylized_s.png")
    assert dpi == pytest.approx((120.0, 120.0), abs=0.013) and exif[ARTIST] == "A. Photographer" and GPS_IFD not in exif
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "none"), "--metadata", "none", "-f", "jpg"])
    assert r.exit_code == 0, r.output
    dpi, exif = _read(tmp_path / "none" / "p_stylized_s.jpg")
    assert MAKE not in exif and ARTIST not in exif
    opt = CliRunner().invoke(app, ["optimize", str(photo), str(style), "-o", str(tmp_path / "opt"), "--iterations", "0",
                                   "--model", str(cd16x_dir), "--style-size", "40", "--metadata", "all"])  # fmt: skip
    assert opt.exit_code == 0, opt.output
    dpi, exif = _read(tmp_path / "opt" / "p_optimized_s.png")
    assert dpi == pytest.approx((240.0, 240.0), abs=0.013) and exif.get_ifd(GPS_IFD)[1] == "N"
