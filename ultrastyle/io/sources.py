"""Images given where a path would go: in-memory pixels (`ImageInput`), a `Source` (a path or one of them), their headers.

What the Python API accepts as an image (`ImageLike`: a path, an (H, W, 3) array
or a PIL image) becomes a `Source` through `as_source`; arrays and PIL images
are read as their files would be (`as_pixels`: transparency over white, EXIF
orientation applied, floats in [0, 1]).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ultrastyle.core.resample import resized_size
from ultrastyle.errors import warn
from ultrastyle.io import metadata as md
from ultrastyle.io.images import (
    AnimatedImageWarning,
    ImageError,
    check_float_range,
    check_pixels,
    clear_transparent,
    image_kind,
    is_rgb16,
    over_white,
    pil_limits_off,
    pil_to_array,
    read_image,
    tiff_header,
)
from ultrastyle.io.profiles import to_srgb

__all__ = ["ImageInput", "ImageLike", "PrecisionWarning", "Source", "as_pixels", "as_source", "image_header", "read_source", "resized_header"]

ImageLike = Union[str, os.PathLike, np.ndarray, Image.Image]


class ImageInput:
    """An image given in memory (an (H, W, 3) array or a PIL image) where a path would go; ``name`` names it in outputs and errors."""

    def __init__(self, pixels: np.ndarray | Image.Image, name: str = "image", *, keep_alpha: bool = False) -> None:
        self.pixels = as_pixels(pixels, name, keep_alpha=keep_alpha)
        self.name = name
        h = hashlib.blake2b(memoryview(self.pixels).cast("B"), digest_size=16)  # contiguous: hashed in place, no copy
        h.update(f"{self.pixels.shape}{self.pixels.dtype}".encode())
        self.key = h.hexdigest()

    @property
    def stem(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageInput) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.name


Source = Union[Path, ImageInput]


def as_pixels(image: np.ndarray | Image.Image, name: str = "image", *, keep_alpha: bool = False) -> np.ndarray:
    """(H, W, 3) uint8, uint16 or float32 in [0, 1] from an array (grey (H, W) too) or a PIL image; ImageError naming it otherwise.

    As a file's pixels (`read_image`): a PIL image's EXIF orientation is applied
    and 16-bit grey kept; transparency (RGBA arrays too) is composited over
    white, or kept as there with ``keep_alpha`` ((H, W, 4), transparent pixels
    all zero; the caller's array is not changed).
    """
    if isinstance(image, Image.Image):
        image = _pil_pixels(image, name, keep_alpha)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or 0 in a.shape[:2]:
        raise ImageError(f"{name}: expected an (H, W, 3) RGB array, got shape {a.shape}")
    if not a.dtype.isnative:  # big-endian samples (FITS, some TIFF readers): the same values in this machine's order
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype in (np.float64, np.float16):
        a = a.astype(np.float32)
    if a.dtype not in (np.uint8, np.uint16, np.float32):
        hint = ""
        if a.dtype == np.int32:
            hint = "; for a PIL image of mode I, convert it to 'I;16' (16-bit) or 'L' (8-bit) to say which"
        if a.dtype.kind in "iu" and a.dtype != np.int32:  # the range says which 8 or 16 bits hold; the type alone does not
            lo, hi = int(a.min()), int(a.max())
            fits = "np.uint8" if 0 <= lo and hi <= 255 else "np.uint16" if 0 <= lo and hi <= 65535 else None
            hint = f"; its samples lie in {lo}..{hi}: " + (f"convert it with .astype({fits})" if fits else "scale them to 0..255 (uint8) or 0..65535 (uint16)")
        elif a.dtype == np.bool_:
            hint = "; a true/false array is a mask: give it as the mask (mask=), or .astype(np.uint8) * 255 as a grey image"
        raise ImageError(f"{name}: expected uint8, uint16 or float32 in [0, 1] samples, got {a.dtype}{hint}")
    if a.dtype == np.float32:
        lo, hi = check_float_range(a, name)
        if lo < 0 or hi > 1:
            a = np.clip(a, 0, 1)  # the slack it allows (alpha too); a copy: the caller's array stays as given
    if a.shape[2] == 4 and keep_alpha:
        return clear_transparent(np.array(a))  # a copy: the caller's array stays as given
    if a.shape[2] == 4:  # as files with transparency are
        return np.ascontiguousarray(over_white(a))
    return np.ascontiguousarray(a[..., :3])  # no copy where the caller's array is already RGB in one block


def _holds_16_bits(image: Image.Image) -> bool:
    """Whether ``image`` was opened from a 16-bit RGB file (its decoder's raw mode before `load`, else the file's header)."""
    if any(";16" in str(t.args) for t in getattr(image, "tile", None) or ()):
        return True
    filename = getattr(image, "filename", "")
    if not filename or image.format not in ("PNG", "TIFF") or not Path(filename).is_file():
        return False
    try:
        return is_rgb16(Path(filename), image)
    except OSError:
        return False


class PrecisionWarning(UserWarning):
    """An input holds fewer bits than its file: a PIL image of a 16-bit RGB file (Pillow keeps 8)."""


def _pil_pixels(image: Image.Image, name: str, keep_alpha: bool) -> np.ndarray:
    """A PIL image's pixels as `pil_to_array` gives a file's; one made in memory in mode F or I as an array (checked as such).

    An opened file of those modes is read by the file's rule (`read_image`); an image made in memory says nothing of its range.
    """
    try:
        if getattr(image, "n_frames", 1) > 1:
            warn(f"{name}: an animation of {image.n_frames} frames; its first frame is used", AnimatedImageWarning)
        made_here = image.format is None
        if image.mode in ("RGB", "RGBA") and _holds_16_bits(image):
            warn(f"{name}: a PIL image of a 16-bit RGB file holds 8 bits per sample (Pillow decodes it so); "
                          "give the file's path to keep 16", PrecisionWarning)  # fmt: skip
        image = ImageOps.exif_transpose(image)
        if made_here and image.mode in ("F", "I"):
            return np.asarray(image)
        return pil_to_array(image if keep_alpha else to_srgb(image, name), keep_alpha=keep_alpha, name=name)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, AssertionError) as exc:  # a truncated file behind it; a closed image asserts
        why = f"{type(exc).__name__}: {exc}" if str(exc) else "closed, or its file cannot be read"
        raise ImageError(f"{name}: cannot read the PIL image ({why})") from exc


def read_source(src: Source, max_pixels: int) -> np.ndarray:
    """The (H, W, 3) pixels of a path (`read_image`) or an in-memory image."""
    if isinstance(src, ImageInput):
        h, w = src.pixels.shape[:2]
        check_pixels(str(src), w, h, max_pixels)
        return src.pixels
    return read_image(src, max_pixels=max_pixels)


def as_source(image: ImageLike, role: str, *, keep_alpha: bool = False) -> Source:
    """A path as a `Path` (``~`` expanded), an array or PIL image as an `ImageInput` named ``role`` (``keep_alpha`` as `as_pixels`);
    TypeError otherwise."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image).expanduser()
    if isinstance(image, (np.ndarray, Image.Image)):
        return ImageInput(image, role, keep_alpha=keep_alpha)
    raise TypeError(f"{role}: expected a path, an (H, W, 3) array or a PIL image, got {type(image).__name__}")


def image_header(src: Source) -> tuple[int, int, int] | None:
    """(width, height, bytes per sample) of ``src`` from its header alone; None when unreadable (the read reports it)."""
    if isinstance(src, ImageInput):
        h, w = src.pixels.shape[:2]
        return w, h, src.pixels.itemsize
    try:
        with pil_limits_off(), Image.open(src) as img:  # the header: no pixel limit applies to reading it
            deep = img.mode in ("I;16", "I;16B", "I", "F") or "16" in img.mode
            return img.size[0], img.size[1], 2 if deep else 1
    except Exception:  # noqa: BLE001
        # A TIFF Pillow cannot open (float RGB, BigTIFF) is read through tifffile (`read_image`): its header too.
        return tiff_header(Path(src)) if image_kind(Path(src)) in ("TIFF", "BigTIFF") else None


def resized_header(src: Source, long_side: int) -> tuple[int, int] | None:
    """(H, W) of ``src`` after resizing its long side to ``long_side`` (0: kept), from its header; None when unreadable."""
    header = image_header(src)
    return None if header is None else resized_size(header[1], header[0], long_side)


def content_meta(content: Source, height: int, width: int, policy: str = "keep") -> md.OutputMeta | None:
    """What an output ``height`` x ``width`` of ``content`` keeps (``policy``: one of `METADATA`); None: nothing.

    Read from the content file's header (Pillow opens it lazily; `io.metadata` says what is kept and how); an
    in-memory content, a file Pillow cannot open or metadata it cannot read give None: metadata never fails an output.
    """
    if policy not in md.METADATA:
        raise ValueError(f"metadata must be one of {', '.join(md.METADATA)}, got {policy!r}")
    if policy == "none" or not isinstance(content, (str, Path)):
        return None
    try:
        with pil_limits_off(), Image.open(content) as img:  # the EXIF's blocks are read from the open file (TIFF)
            return _kept_meta(img, height, width, policy)
    except Exception:  # noqa: BLE001 - unreadable metadata (a float TIFF, a malformed block): the output goes without
        return None


def _kept_meta(img: Image.Image, height: int, width: int, policy: str) -> md.OutputMeta | None:
    if img.format == "PNG":  # PNG's getexif() decodes the whole image where no eXIf chunk comes before the pixels
        exif = Image.Exif()
        if raw := img.info.get("exif"):
            exif.load(raw)
    else:
        exif = img.getexif()
    turned = exif.get(md.ORIENTATION) in md.TURNED
    stored_w, stored_h = img.size
    shown_w, shown_h = (stored_h, stored_w) if turned else (stored_w, stored_h)
    dpi = _dpi(img.info.get("dpi")) or _exif_dpi(exif)
    out_dpi = None
    if dpi is not None:
        dx, dy = (dpi[1], dpi[0]) if turned else dpi
        out_dpi = (dx * width / shown_w, dy * height / shown_h)  # the same print size
    out_exif = None
    if len(exif):
        kept = Image.Exif()  # built afresh: classic TIFF form, the descriptive tags alone
        for tag in md.KEPT_IFD0:
            if tag in exif:
                kept[tag] = exif[tag]
        kept[md.ORIENTATION] = 1  # the pixels are turned already
        if out_dpi is not None:
            kept[md.X_RESOLUTION], kept[md.Y_RESOLUTION], kept[md.RESOLUTION_UNIT] = out_dpi[0], out_dpi[1], 2  # inches
        sub = dict(exif.get_ifd(md.EXIF_IFD))
        if md.PIXEL_X in sub or md.PIXEL_Y in sub:
            sub[md.PIXEL_X], sub[md.PIXEL_Y] = width, height
        sub[md.COLOR_SPACE] = 1  # sRGB: what the pixels are
        kept.get_ifd(md.EXIF_IFD).update(sub)
        if policy == "all" and (gps := exif.get_ifd(md.GPS_IFD)):
            kept.get_ifd(md.GPS_IFD).update(gps)
        out_exif = kept.tobytes()
        if len(out_exif) > md.JPEG_EXIF_MAX and md.MAKER_NOTE in sub:
            del kept.get_ifd(md.EXIF_IFD)[md.MAKER_NOTE]
            out_exif = kept.tobytes()
        if len(out_exif) > md.JPEG_EXIF_MAX:  # too long for any JPEG: left out everywhere, alike
            out_exif = None
    if out_dpi is None and out_exif is None:
        return None
    return md.OutputMeta(out_dpi, out_exif)


def _dpi(value: object) -> tuple[float, float] | None:
    """Pillow's ``info["dpi"]`` (numbers, or IFDRationals from EXIF or TIFF) as two positive floats, else None."""
    try:
        x, y = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y) else None


def _exif_dpi(exif: Image.Exif) -> tuple[float, float] | None:
    """The EXIF's own resolution (a file with no JFIF density or pHYs chunk), per inch; None without a unit."""
    unit = exif.get(md.RESOLUTION_UNIT, 2)
    per_inch = {2: 1.0, 3: 2.54}.get(unit)  # 2: inches, 3: centimetres; 1 (no unit) says nothing of size
    found = _dpi((exif.get(md.X_RESOLUTION), exif.get(md.Y_RESOLUTION)))
    return None if per_inch is None or found is None else (found[0] * per_inch, found[1] * per_inch)
