"""Embedded ICC colour profiles, converted to sRGB: the space the networks were trained in and outputs are written in.

A phone photo (Display P3) or a camera set to Adobe RGB holds its colours in
that space: taken as sRGB they come out dull or washed out, and a CMYK file's
colours are only guessed without its profile. 8-bit RGB, RGBA (alpha kept) and
CMYK pixels go through LittleCMS (Pillow's ImageCms) with the profile's own
rendering intent. The conversion is pixel by pixel, so a band of rows converts
as the whole image does (`io.stream`).

Left as decoded, with no word: a profile that maps every 8-bit colour within 1
of itself (an sRGB profile under another name: most files that carry one), grey
images (a grey profile's curve is near sRGB's). Left as decoded with a
`ProfileWarning`: 16-bit and float samples (ImageCms converts 8 bits), a
profile that cannot be read or does not fit the pixels (an RGB profile on CMYK).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageCms

from ultrastyle.errors import warn

ICC_TAG = 34675  # TIFF InterColorProfile
_SPACES = {"RGB": "RGB ", "RGBA": "RGB ", "CMYK": "CMYK"}  # PIL mode -> the ICC colour space its profile must have
SRGB_SLACK = 1  # 8-bit levels: a profile within this of sRGB's on every test colour is taken as sRGB


class ProfileWarning(UserWarning):
    """An embedded colour profile that is not applied: the pixels are taken as sRGB."""


Converter = Callable[[Image.Image], Image.Image]


def _profile(icc: bytes) -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(io.BytesIO(icc))


def _name(profile: ImageCms.ImageCmsProfile) -> str:
    try:
        return ImageCms.getProfileDescription(profile).strip() or "unnamed"
    except ImageCms.PyCMSError:
        return "unnamed"


@functools.lru_cache(maxsize=32)
def _srgb_like(icc: bytes) -> bool:
    """Whether an RGB profile maps a 16^3 grid of 8-bit colours and the grey ramp within `SRGB_SLACK` of themselves."""
    levels = np.linspace(0, 255, 16).round().astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    colours = np.concatenate([grid, ramp])[None]
    transform = ImageCms.buildTransform(_profile(icc), ImageCms.createProfile("sRGB"), "RGB", "RGB")
    out = np.asarray(ImageCms.applyTransform(Image.fromarray(colours, "RGB"), transform))
    return int(np.abs(out.astype(np.int16) - colours).max()) <= SRGB_SLACK


def srgb_converter(icc: bytes | None, mode: str, name: str) -> Converter | None:
    """A function turning 8-bit images of PIL ``mode`` in profile ``icc`` into sRGB ones, or None where none is needed.

    ``mode`` "RGB" and "CMYK" give "RGB" images, "RGBA" gives "RGBA" (alpha kept); RGB and RGBA images are converted
    in place (the caller's image changes). None, silently, for no profile, an
    sRGB profile and other modes; None with a `ProfileWarning` naming ``name`` for a profile that cannot be read or
    does not fit ``mode``.
    """
    if not icc or mode not in _SPACES:
        return None
    try:
        profile = _profile(icc)
        space = profile.profile.xcolor_space
        if space != _SPACES[mode]:
            warn(f"{name}: its colour profile ({_name(profile)}) is for {space.strip()} pixels, not {mode}; "
                 "colours are taken as sRGB", ProfileWarning)  # fmt: skip
            return None
        if space == "RGB " and _srgb_like(bytes(icc)):
            return None
        transform = ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, "RGBA" if mode == "RGBA" else "RGB",
                                            renderingIntent=ImageCms.getDefaultIntent(profile))  # fmt: skip
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        warn(f"{name}: its colour profile cannot be read ({exc}); colours are taken as sRGB", ProfileWarning)
        return None

    def convert(img: Image.Image) -> Image.Image:
        if mode == "CMYK":
            return ImageCms.applyTransform(img, transform)
        img = img.copy() if img.readonly else img  # an image over a numpy buffer (`Image.fromarray`) is read-only
        ImageCms.applyTransform(img, transform, inPlace=True)  # no second full-size image while the first is held
        return img

    return convert


def to_srgb(img: Image.Image, name: str) -> Image.Image:
    """An opened 8-bit image with its embedded profile (``img.info["icc_profile"]``) applied: RGB, RGBA or CMYK -> sRGB.

    Palette images with a profile are expanded to RGB(A) first. Other modes, and images without a profile or with an
    sRGB one, come back as they are.
    """
    icc = img.info.get("icc_profile")
    if not icc:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "LA", "1"):
        return img
    converter = srgb_converter(icc, img.mode, name)
    return converter(img) if converter else img


def array_to_srgb(a: np.ndarray, icc: bytes | None, name: str) -> np.ndarray:
    """(H, W, 3 or 4) decoded samples in profile ``icc`` as sRGB: uint8 converted (alpha kept; in place where ``a`` is
    writable), 16-bit and float left with a `ProfileWarning` where their profile is not sRGB. Grey (H, W) and
    profile-less arrays come back as they are."""
    if not icc or a.ndim != 3 or a.shape[2] not in (3, 4):
        return a
    mode = "RGB" if a.shape[2] == 3 else "RGBA"
    if a.dtype != np.uint8:
        unconverted(icc, name)
        return a
    converter = srgb_converter(icc, mode, name)
    if converter is None:
        return a
    out = a if a.flags.writeable else a.copy()  # converted in place, a band of rows at a time: no second full-size image
    rows = max(1, BAND_BYTES // (a.shape[1] * a.shape[2]))
    for r0 in range(0, a.shape[0], rows):
        band = np.ascontiguousarray(out[r0 : r0 + rows])
        out[r0 : r0 + rows] = np.asarray(converter(Image.fromarray(band, mode)))
    return out


BAND_BYTES = 4 * 2**20


def unconverted(icc: bytes | None, name: str) -> None:
    """Warn that 16-bit or float RGB samples keep their values although their profile ``icc`` is not sRGB."""
    if not icc:
        return
    try:
        profile = _profile(icc)
        if profile.profile.xcolor_space != "RGB " or _srgb_like(bytes(icc)):
            return
        what = _name(profile)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        what = "unreadable"
    warn(f"{name}: its colour profile ({what}) is not applied to 16-bit or float samples; colours are taken as sRGB "
         "(convert the file to sRGB, or to 8 bits, to have it applied)", ProfileWarning)  # fmt: skip


__all__ = ["ICC_TAG", "ProfileWarning", "SRGB_SLACK", "array_to_srgb", "srgb_converter", "to_srgb", "unconverted"]
