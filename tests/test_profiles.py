"""io.profiles: embedded ICC profiles are converted to sRGB, checked against the published colour-space maths."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultrastyle.io.images import read_image
from ultrastyle.io.profiles import ProfileWarning
from ultrastyle.io.sources import as_pixels

ADOBE = "images/train/gcompris_explore_monuments_christTheRedeemer.webp"  # carries "Adobe RGB (1998)"
SRGB = "images/train/plasma_Kite.jpg"  # carries "sRGB IEC61966-2.1"

# Adobe RGB (1998) and sRGB, both D65: the Adobe RGB (1998) Color Image Encoding spec (2005) and IEC 61966-2-1.
ADOBE_TO_XYZ = np.array([[0.57667, 0.18556, 0.18823], [0.29734, 0.62736, 0.07529], [0.02703, 0.07069, 0.99134]])
XYZ_TO_SRGB = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])


def adobe_to_srgb(rgb: np.ndarray) -> np.ndarray:
    """8-bit Adobe RGB colours as 8-bit sRGB, from the two specifications (not LittleCMS)."""
    linear = (rgb / 255.0) ** (563 / 256)
    s = np.clip(linear @ ADOBE_TO_XYZ.T @ XYZ_TO_SRGB.T, 0, 1)
    s = np.where(s <= 0.0031308, 12.92 * s, 1.055 * s ** (1 / 2.4) - 0.055)
    return s * 255


def icc_of(path: Path) -> bytes:
    with Image.open(path) as im:
        return im.info["icc_profile"]


@pytest.fixture(scope="module")
def adobe_icc(shared_dir: Path) -> bytes:
    return icc_of(shared_dir / ADOBE)


COLOURS = np.array([[128, 128, 128], [200, 60, 40], [40, 180, 90], [30, 60, 200], [250, 240, 20], [90, 50, 120]], np.uint8)


def patches(colours: np.ndarray, size: int = 8) -> np.ndarray:
    """Flat squares of each colour side by side: (size, size * n, 3), lossless in PNG."""
    return np.repeat(np.repeat(colours[None], size, axis=0), size, axis=1)


def test_an_adobe_rgb_png_is_read_as_the_specifications_map_it_to_srgb(tmp_path, adobe_icc):
    p = tmp_path / "adobe.png"
    Image.fromarray(patches(COLOURS)).save(p, icc_profile=adobe_icc)
    got = read_image(p)[4, 4::8].astype(float)
    want = adobe_to_srgb(COLOURS.astype(float))
    assert np.abs(got - want).max() <= 2.0, (got, want)  # LittleCMS's D50 round trip and 8-bit rounding
    assert np.abs(got - COLOURS).max() >= 20  # the conversion is real: untouched, green would be far off
    # the same file given from Python as an opened PIL image reads the same
    with Image.open(p) as im:
        assert np.array_equal(as_pixels(im, "adobe"), read_image(p))


def test_an_srgb_profile_leaves_pixels_as_decoded_and_a_mask_keeps_its_painted_colours(tmp_path, shared_dir, adobe_icc):
    p = tmp_path / "srgb.png"
    Image.fromarray(patches(COLOURS)).save(p, icc_profile=icc_of(shared_dir / SRGB))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(read_image(p), patches(COLOURS))
    m = tmp_path / "mask.png"
    Image.fromarray(patches(COLOURS)).save(m, icc_profile=adobe_icc)
    assert np.array_equal(read_image(m, keep_alpha=True), patches(COLOURS))  # labels, not colours


def test_transparency_is_kept_through_the_conversion_and_composited_after_it(tmp_path, adobe_icc):
    rgba = np.concatenate([patches(COLOURS), np.full((8, 8 * len(COLOURS), 1), 255, np.uint8)], axis=2)
    rgba[:, :8, 3] = 0  # the first patch fully transparent: white whatever its colour
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(p, icc_profile=adobe_icc)
    got = read_image(p)
    assert (got[:, :8] == 255).all()
    assert np.abs(got[4, 12::8].astype(float) - adobe_to_srgb(COLOURS[1:].astype(float))).max() <= 2.0


def test_16_bit_samples_keep_their_values_with_a_warning_naming_the_file_and_profile(tmp_path, adobe_icc):
    import tifffile

    a = (patches(COLOURS).astype(np.uint16) * 257).astype(np.uint16)
    p = tmp_path / "deep.tif"
    tifffile.imwrite(p, a, photometric="rgb", extratags=[(34675, 7, len(adobe_icc), adobe_icc, True)])
    with pytest.warns(ProfileWarning, match=r"deep\.tif: its colour profile \(Adobe RGB \(1998\)\) is not applied to 16-bit"):
        got = read_image(p)
    assert got.dtype == np.uint16 and np.array_equal(got, a)


def test_a_broken_or_mismatched_profile_is_warned_of_and_the_pixels_taken_as_srgb(tmp_path, adobe_icc):
    p = tmp_path / "broken.png"
    Image.fromarray(patches(COLOURS)).save(p, icc_profile=b"not a profile at all" * 8)
    with pytest.warns(ProfileWarning, match=r"broken\.png: its colour profile cannot be read"):
        assert np.array_equal(read_image(p), patches(COLOURS))
    c = tmp_path / "cmyk.jpg"
    Image.fromarray(patches(COLOURS)).convert("CMYK").save(c, icc_profile=adobe_icc, quality=95)
    with pytest.warns(ProfileWarning, match=r"cmyk\.jpg: its colour profile \(Adobe RGB \(1998\)\) is for RGB pixels, not CMYK"):
        got = read_image(c)
    with Image.open(c) as im:
        assert np.array_equal(got, np.asarray(im.convert("RGB")))  # Pillow's own CMYK conversion, as without a profile


def test_streamed_bands_convert_as_the_whole_read_does(tmp_path, shared_dir, adobe_icc):
    pytest.importorskip("pyvips", reason="streaming reads need pyvips (pip install 'ultrastyle[vips]')")
    from ultrastyle.io.stream import open_stream, stream_blocker

    rng = np.random.default_rng(0)
    a = (rng.random((97, 131, 4)) * 255).astype(np.uint8)
    files = {"adobe.jpg": (Image.fromarray(a[..., :3]), {"quality": 90}), "adobe.png": (Image.fromarray(a, "RGBA"), {})}
    for name, (im, kwargs) in files.items():
        im.save(tmp_path / name, icc_profile=adobe_icc, **kwargs)
    files["photo.webp"] = None  # a real camera file in Adobe RGB
    for name in files:
        p = shared_dir / ADOBE if files[name] is None else tmp_path / name
        assert stream_blocker(p) is None, name
        bands = np.concatenate([b for _, b in open_stream(p, max_pixels=10**9).bands(13)])
        whole = read_image(p)
        assert np.array_equal(bands, whole), name
        with Image.open(p) as im:
            assert np.abs(whole.astype(int) - np.asarray(im.convert("RGB"))).max() >= 10, name  # converted, not as decoded


def test_a_turned_tiff_read_through_tifffile_converts_as_the_plain_one_does(tmp_path, adobe_icc, monkeypatch):
    import tifffile

    import ultrastyle.io.profiles as profiles

    monkeypatch.setattr(profiles, "BAND_BYTES", 1000)  # several bands: the in-place conversion band by band
    a = (np.random.default_rng(1).random((40, 64, 3)) * 255).astype(np.uint8)
    icc = [(34675, 7, len(adobe_icc), adobe_icc, True)]
    tifffile.imwrite(tmp_path / "plain.tif", a, photometric="rgb", metadata=None, extratags=icc)
    tifffile.imwrite(tmp_path / "turned.tif", a, photometric="rgb", metadata=None, extratags=[*icc, (274, "H", 1, 6, True)])
    plain = read_image(tmp_path / "plain.tif")  # Pillow's path
    assert np.abs(plain.astype(int) - a).max() >= 10  # converted
    assert np.array_equal(read_image(tmp_path / "turned.tif"), np.rot90(plain, -1))  # tifffile's path, then turned
