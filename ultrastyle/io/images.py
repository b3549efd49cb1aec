"""Reading and writing images as float tensors, with one clear error per bad file.

Images are (3, H, W) float32 RGB in [0, 1]. Outputs are written to a temporary
file beside the target and renamed, so no partial file is ever left.
"""

from __future__ import annotations

import glob
import io
import math
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ultrastyle.core.canvas import sample_peak
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.io.atomic import atomic_write
from ultrastyle.io.constants import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_STYLE_SIZE, IMAGE_SUFFIXES  # noqa: F401 - re-exported
from ultrastyle.io.profiles import ICC_TAG, array_to_srgb, to_srgb, unconverted

if TYPE_CHECKING:
    from ultrastyle.io.metadata import OutputMeta

FORMATS = {"png": "PNG", "jpg": "JPEG", "tiff": "TIFF"}


class ImageError(ValueError):
    """A file that cannot be read or written as an image; the message names file and cause."""


class AnimatedImageWarning(UserWarning):
    """An image with several frames: its first frame is used."""


@contextmanager
def pil_limits_off() -> Iterator[None]:
    # Pillow's own guard (a warning above MAX_IMAGE_PIXELS, an error above twice that) is off while a file is
    # opened here: `check_pixels` reads the header's size against ``max_pixels`` before anything is decoded,
    # so there is one limit and one message. (Pillow reads the global at open time only.)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def as_role(role: str, exc: ImageError) -> ImageError:
    """``exc`` said of the image's role (``style photo.jpg: cannot read ...``), its remedy kept (a front end names its setting)."""
    return remedied(ImageError(f"{role} {exc}"), getattr(exc, "remedy", None))


def pixel_count(n: int) -> str:
    """``"268 MP"``, ``"0.25 MP"`` or ``"100 pixels"``: readable at any size."""
    return f"{n / 1e6:.0f} MP" if n >= 10**7 else f"{n / 1e6:.3g} MP" if n >= 10**4 else f"{n} pixels"


def check_pixels(path: Path | str, width: int, height: int, max_pixels: int) -> None:
    """Refuse, before decoding, an image whose header promises more than ``max_pixels`` or no pixels; `ImageError`."""
    if width * height > max_pixels:
        raise remedied(ImageError(f"{path}: {width}x{height} = {pixel_count(width * height)} is above the limit of "
                                  f"{pixel_count(max_pixels)} (max_pixels); raise the limit to read it"), Setting("max_pixels"))  # fmt: skip
    if width == 0 or height == 0:
        raise ImageError(f"{path}: zero-size image ({width}x{height})")


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read ``path`` as (3, H, W) float32 RGB in [0, 1] (see `read_image`)."""
    return array_to_tensor(read_image(path, max_pixels=max_pixels))


def array_to_tensor(a: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8/uint16/float32 -> (3, H, W) float32 in [0, 1]."""
    peak = sample_peak(a.dtype)
    return torch.from_numpy(a.astype(np.float32) / np.float32(peak)).permute(2, 0, 1).contiguous()


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, keep_alpha: bool = False) -> np.ndarray:
    """Read ``path`` as an (H, W, 3) RGB array: uint8, uint16 (16-bit files) or float32 in [0, 1].

    EXIF orientation is applied; grey, palette and CMYK images become RGB;
    transparency is composited over white (``keep_alpha``: an image with
    transparency is (H, W, 4) RGBA instead, its fully transparent pixels all
    zero, and a grey one (H, W), as a mask's labels want); 16-bit grey and 16-bit RGB PNG/TIFF
    keep their precision. Raises `ImageError` naming the file and the cause.
    """
    path = Path(path)
    try:
        if not path.exists():  # a glob that matched nothing is kept as given (`expand_inputs`), to be reported here
            raise ImageError(f"{path}: {'no file matches this pattern' if glob.has_magic(str(path)) else 'no such file'}")
        if path.is_dir():
            raise ImageError(f"{path}: is a directory, not an image")
        if not path.is_file():  # the header is read twice, and the file once more for PNG checks: a pipe has none of it
            raise ImageError(f"{path}: not a regular file (a pipe or a device); save the image to a file and give that")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with pil_limits_off(), Image.open(path) as img:
            check_pixels(path, *img.size, max_pixels)
            if getattr(img, "n_frames", 1) > 1 and img.format in ("GIF", "PNG", "WEBP"):
                warn(f"{path}: an animation of {img.n_frames} frames; its first frame is used", AnimatedImageWarning)
            if img.format == "PNG":  # before any decoder allocates the w x h image the header claims
                check_png_data(path)
            if img.format == "TIFF" and (orientation := img.tag_v2.get(ORIENTATION, 1)) != 1:
                # Pillow turns a TIFF by its tag on load, and scrambles uncompressed ones turned 5-8 (Pillow 13: grey,
                # RGBA, palette, CMYK); tifffile's samples, turned here, are right.
                found = _read_tiff(path, max_pixels, keep_alpha)
                if found is None:
                    found = _read_turned_tiff(path, orientation, keep_alpha)
                if found is not None:
                    return found
            if img.format == "TIFF" and (pages := tiff_pages(path)) > 1:
                warn(f"{path}: a TIFF of {pages} pages; its first page is used", AnimatedImageWarning)
            if is_rgb16(path, img):
                if not keep_alpha:
                    unconverted(img.info.get("icc_profile"), str(path))
                return _orient(_read_rgb16(path, img.format, keep_alpha), img.getexif().get(ORIENTATION, 1))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no second full-size copy
            # A mask's colours are labels, matched as painted: its profile is not applied.
            return pil_to_array(img if keep_alpha else to_srgb(img, str(path)), keep_alpha=keep_alpha, name=str(path))
    except ImageError:
        raise
    except PermissionError as exc:
        raise ImageError(f"{path}: cannot read the file (permission denied)") from exc
    except UnidentifiedImageError as exc:
        kind = image_kind(path)
        if kind in ("TIFF", "BigTIFF"):  # float RGB and other layouts Pillow does not open
            found = _read_tiff(path, max_pixels, keep_alpha, only_reader=True)
            if found is not None:
                return found
        if kind:  # the file says what it is, but its header or directory is cut or damaged
            raise ImageError(f"{path}: truncated or corrupt {kind} file (its header or directory cannot be read)") from exc
        raise ImageError(f"{path}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # imagecodecs raises its own errors
        if image_kind(path) in ("TIFF", "BigTIFF"):  # a compression Pillow's libtiff lacks (WebP, zstd...) that tifffile's codecs read
            found = _read_tiff(path, max_pixels, keep_alpha, only_reader=True)
            if found is not None:
                return found
        raise ImageError(f"{path}: truncated or corrupt image data ({exc})") from exc


ORIENTATION = 0x0112
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
               (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"), (b"GIF8", "GIF"), (b"BM", "BMP"))  # fmt: skip


def image_kind(path: Path) -> str | None:
    """The format a file's first bytes announce (None: none this module knows)."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Deflate cannot compress better than 1032:1 (a 258-byte match costs at least 2 bits), so
# compressed data shorter than a 1032nd of the pixel data it claims is truncated for sure.
DEFLATE_MAX_RATIO = 1032
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """The bytes a PNG's IDAT stream must inflate to: every scanline of every pass plus its filter byte."""
    bits = _PNG_CHANNELS[colour_type] * bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        pw, ph = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if pw > 0 and ph > 0:  # an empty pass has no scanlines, not even filter bytes
            total += ph * (1 + (pw * bits + 7) // 8)
    return total


def check_png_data(path: Path, *, chunk: int = 1 << 20) -> None:
    """Refuse a PNG whose image data cannot fill the image its header claims; `ImageError` naming the file.

    Pillow's PNG decoder stops without an error where the zlib stream ends,
    even before the last row (libImaging/ZipDecode.c returns "end of file,
    errcode=0" on Z_STREAM_END; the check that image and data end together is
    commented out there), so ``ImageFile.LOAD_TRUNCATED_IMAGES`` = False does
    not catch it: a 370-byte file claiming 19000x19000 decoded to a flat
    1 GB image. Checked here before any decoding: first the IDAT chunks'
    total length against deflate's best ratio (no inflating), then the
    stream is inflated in ``chunk``-sized pieces that are counted and dropped
    (memory stays at ~``chunk``) until it has produced every scanline.
    """
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            return
        head = f.read(25)
        if len(head) < 25 or head[4:8] != b"IHDR":
            raise ImageError(f"{path}: corrupt PNG: no IHDR chunk after the signature")
        width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[8:21])
        if ctype not in _PNG_CHANNELS:
            raise ImageError(f"{path}: corrupt PNG: unknown colour type {ctype}")
        need = png_data_size(width, height, depth, ctype, interlace == 1)
        idat: list[tuple[int, int]] = []  # (offset, length) of each IDAT chunk's data
        pos = 8 + 25
        size = os.fstat(f.fileno()).st_size
        while pos + 8 <= size:  # walk the chunk headers only: seeks, no data read
            f.seek(pos)
            length, kind = struct.unpack(">I4s", f.read(8))
            if kind == b"IDAT":
                idat.append((pos + 8, min(length, max(0, size - pos - 8))))
            elif idat or kind == b"IEND":  # IDAT chunks are consecutive: the image data has ended
                break
            pos += 12 + length
        have = sum(n for _, n in idat)
        claim = f"the header claims {width}x{height} ({need / 1e6:.1f} MB of pixel data)" if need >= 10**5 else f"the header claims {width}x{height} ({need} bytes of pixel data)"
        if have * DEFLATE_MAX_RATIO + 64 < need:
            raise ImageError(f"{path}: truncated PNG: {claim} but its compressed image data is {have} bytes, too short to hold it")
        inflater = zlib.decompressobj()
        got = 0
        try:
            for offset, length in idat:
                f.seek(offset)
                left = length
                while left and got < need:
                    data = f.read(min(chunk, left))
                    if not data:
                        break
                    left -= len(data)
                    while got < need:  # at most ``chunk`` bytes out per call; the rest of the input waits
                        out = len(inflater.decompress(data, chunk))
                        got += out
                        data = inflater.unconsumed_tail
                        if not data and (not out or inflater.eof):  # input used up and nothing pending
                            break
                if got >= need:
                    return
        except zlib.error as exc:
            raise ImageError(f"{path}: corrupt PNG image data ({exc})") from None
        rows = ""
        if not interlace:
            rows = f": {got // (1 + (width * _PNG_CHANNELS[ctype] * depth + 7) // 8)} of {height} rows"
        raise ImageError(f"{path}: truncated PNG: {claim} but its image data ends after {got} bytes{rows}")


def check_tiff_data(path: Path) -> None:
    """Refuse a TIFF whose first image's strips or tiles reach past the end of the file; `ImageError` naming it.

    libvips reads such strips as warnings (zeros where the data is missing), so the directory is checked first:
    tifffile reads the offsets and byte counts only, no pixel data.
    """
    import tifffile

    size = path.stat().st_size
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
    except (tifffile.TiffFileError, ValueError, IndexError, OSError) as exc:
        raise ImageError(f"{path}: truncated or corrupt TIFF file ({exc})") from None
    if ends and max(ends) > size:
        raise ImageError(f"{path}: truncated TIFF: its image data runs to byte {max(ends)} but the file ends at {size}")


def is_rgb16(path: Path, img: Image.Image) -> bool:
    """PIL reads 16-bit RGB (and grey + alpha) PNG/TIFF as 8 bits; those files take the lossless path."""
    if img.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)
        return len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6)  # IHDR bit depth, colour type
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, (8,))
        return img.mode in ("RGB", "RGBA", "RGBX") and max(bits) == 16
    return False


def tiff_pages(path: Path) -> int:
    """Images in a TIFF file, its reduced-resolution levels (a pyramid's) not counted; 1 if tifffile cannot tell."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return _page_count(tif)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, AttributeError):
        return 1


def _page_count(tif: object) -> int:
    """`tiff_pages` of an open ``tifffile.TiffFile``.

    By index after ``len``: iterating the pages follows a chain of directories that loops back forever (a 792-byte
    file hung a batch past SIGTERM), where ``len`` stops at the loop."""
    pages = tif.pages  # type: ignore[attr-defined]
    return max(1, sum(1 for i in range(len(pages)) if not pages[i].is_reduced))


MAX_SAMPLES = 4  # grey, grey + alpha, RGB, RGBA: what a TIFF may hold per pixel to be read


def _check_layout(path: Path, page: object) -> None:
    """`ImageError` for a TIFF page of more samples per pixel (or depth) than an image has, before its pixels are
    decoded: ``max_pixels`` counts pixels, and 32 float64 samples a pixel are 85 times an RGB image's bytes."""
    samples, depth = int(page.samplesperpixel), int(getattr(page, "imagedepth", 1) or 1)  # type: ignore[attr-defined]
    if samples > MAX_SAMPLES or depth > 1:
        what = f"{samples} samples per pixel" if samples > MAX_SAMPLES else f"a depth of {depth} planes"
        raise ImageError(f"{path}: a TIFF of {what}; images of at most {MAX_SAMPLES} samples per pixel in one plane (grey, RGB, "
                         "CMYK, grey or RGB with alpha) are read")  # fmt: skip


def tiff_header(path: Path) -> tuple[int, int, int] | None:
    """(width, height, bytes per sample) of a TIFF Pillow cannot open (float samples, BigTIFF), from tifffile; None if it cannot."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagewidth), int(page.imagelength), int(page.dtype.itemsize) if page.dtype is not None else 1
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, AttributeError):
        return None


def _read_tiff(path: Path, max_pixels: int, keep_alpha: bool = False, only_reader: bool = False) -> np.ndarray | None:
    """A TIFF Pillow cannot open (float samples, BigTIFF) through tifffile, as `read_image` gives pixels; None if it cannot either."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            check_pixels(path, page.imagewidth, page.imagelength, max_pixels)  # an ImageError: a ValueError, not caught below
            if only_reader:  # Pillow cannot open it: refused here before its samples are decoded
                _check_layout(path, page)
            elif int(page.samplesperpixel) > MAX_SAMPLES or int(getattr(page, "imagedepth", 1) or 1) > 1:
                return None  # Pillow opened it (RGB with extra samples, say): Pillow reads it
            if int(page.photometric) not in (1, 2):  # grey (black is 0) or RGB; CMYK, palette, white-is-0: not guessed at
                return None
            a = _grey_alpha_as_rgba(_interleaved(page.asarray(), page))
            tag = page.tags.get(ORIENTATION)  # a TiffPage has no orientation attribute: the tag itself
            orientation = int(tag.value) if tag is not None else 1
            icc = _icc(page)
            pages = _page_count(tif)
    except ImageError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError):
        return None
    grey = a.ndim == 2 and keep_alpha  # as `read_image` gives a mask's labels: (H, W), not three copies
    if a.ndim == 2:
        a = a[..., None] if grey else np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in ((1,) if grey else (3, 4)) or a.dtype.kind not in "uf":
        return None
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
        check_float_range(a, str(path))  # as a float image Pillow opens (mode F) is read
        np.clip(a, 0, 1, out=a)
    elif a.dtype not in (np.uint8, np.uint16):
        return None
    if pages > 1:
        warn(f"{path}: a TIFF of {pages} pages; its first page is used", AnimatedImageWarning)
    if grey:
        return np.ascontiguousarray(_orient(a, orientation)[..., 0])
    if not keep_alpha:
        a = array_to_srgb(a, icc, str(path))
    return _orient(_alpha(a, keep_alpha) if a.shape[2] == 4 else np.ascontiguousarray(a), orientation)


def _icc(page: object) -> bytes | None:
    """The embedded ICC profile of a tifffile page, or None."""
    tag = page.tags.get(ICC_TAG)  # type: ignore[attr-defined]
    return bytes(tag.value) if tag is not None and tag.value else None


def _read_turned_tiff(path: Path, orientation: int, keep_alpha: bool) -> np.ndarray | None:
    """A palette or CMYK TIFF with an orientation tag: tifffile's samples, converted as Pillow converts them, then turned.

    None for other layouts (Pillow reads them). The size was checked by the caller.
    """
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            photometric = int(page.photometric)
            if photometric == 3 and page.colormap is not None and int(page.bitspersample) == 8 and int(page.samplesperpixel) == 1:
                img = Image.fromarray(np.ascontiguousarray(page.asarray()), "P")
                cmap = np.asarray(page.colormap)
                img.putpalette(((cmap >> 8) if cmap.max() > 255 else cmap).astype(np.uint8).T.tobytes())
            elif photometric == 5 and page.samplesperpixel == 4 and int(page.bitspersample) == 8:
                img = Image.fromarray(np.ascontiguousarray(_interleaved(page.asarray(), page)), "CMYK")
            else:
                return None
            if (icc := _icc(page)) and not keep_alpha:
                img.info["icc_profile"] = icc
                img = to_srgb(img, str(path))
    except (tifffile.TiffFileError, ValueError, OSError, IndexError):
        return None
    return np.ascontiguousarray(_orient(pil_to_array(img, keep_alpha=keep_alpha, name=str(path)), orientation))


def _interleaved(a: np.ndarray, page: object) -> np.ndarray:
    """tifffile's samples of a planar (``planarconfig`` separate) page, (S, H, W), as (H, W, S)."""
    if a.ndim == 3 and int(getattr(page, "planarconfig", 1)) == 2:
        return np.moveaxis(a, 0, -1)
    return a


def _read_rgb16(path: Path, fmt: str, keep_alpha: bool = False) -> np.ndarray:
    import imagecodecs
    import tifffile

    if fmt == "TIFF":
        with tifffile.TiffFile(path) as tif:
            _check_layout(path, tif.pages[0])
            a = _interleaved(tif.pages[0].asarray(), tif.pages[0])
    else:
        a = imagecodecs.png_decode(path.read_bytes())
    a = _grey_alpha_as_rgba(a)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"{path}: unsupported 16-bit layout {a.shape}")
    if a.shape[2] == 4:
        a = _alpha(a, keep_alpha)
    return np.ascontiguousarray(a, dtype=np.uint16)


def _alpha(a: np.ndarray, keep_alpha: bool) -> np.ndarray:
    """Decoded RGBA pixels (owned: changed in place) as ``keep_alpha`` asks: `clear_transparent`, else `over_white`."""
    return clear_transparent(a) if keep_alpha else over_white(a)


def clear_transparent(a: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) with every fully transparent pixel all zero, in place: what its colour channels hold is not seen.

    So a mask painted on a transparent layer has one label there, whatever colours the painting program left under it.
    """
    a[a[..., 3] == 0] = 0
    return a


def over_white(a: np.ndarray) -> np.ndarray:
    """RGBA (H, W, 4) composited over white: (H, W, 3) in its own dtype (uint8, uint16, or float in [0, 1]).

    In float, so 16-bit samples keep their precision.
    """
    peak = 1.0 if a.dtype.kind == "f" else float(np.iinfo(a.dtype).max)
    alpha = a[..., 3:].astype(np.float32) / peak
    rgb = a[..., :3].astype(np.float32) * alpha + peak * (1 - alpha)
    return rgb if a.dtype.kind == "f" else (rgb + 0.5).astype(a.dtype)


# Float samples this far outside [0, 1] are clipped: resampling's over- and undershoot. Beyond it the data has
# another range (0..255, HDR), which clipping would turn white without a word.
FLOAT_SLACK = 0.05


def check_float_range(a: np.ndarray, name: str) -> tuple[float, float]:
    """The least and greatest float sample, once they lie in [0, 1] within `FLOAT_SLACK`: else `ImageError` naming ``name``.

    Callers clip what passes (where the range says there is anything to clip).
    """
    lo, hi = float(np.min(a)), float(np.max(a))  # NaN propagates, and fails the test below
    if math.isnan(lo) or math.isnan(hi):
        raise ImageError(f"{name}: float samples must lie in [0, 1], and some are NaN")
    if not (lo >= -FLOAT_SLACK and hi <= 1 + FLOAT_SLACK):
        hint = "; divide 0..255 data by 255" if 1.5 < hi < math.inf else ""
        raise ImageError(f"{name}: float samples must lie in [0, 1], got {lo:g}..{hi:g}{hint}")
    return lo, hi


def _check_int_range(a: np.ndarray, name: str) -> np.ndarray:
    """32-bit integer grey samples (Pillow's mode I) as uint16, after checking they fit 0..65535; `ImageError` naming ``name``."""
    lo, hi = int(np.min(a)), int(np.max(a))
    if lo < 0 or hi > 65535:
        raise ImageError(f"{name}: 32-bit integer samples {lo}..{hi} do not fit 16 bits; save it as 16-bit (0..65535) or 8-bit")
    return a.astype(np.uint16)


def _grey_alpha_as_rgba(a: np.ndarray) -> np.ndarray:
    """(H, W, 2) grey + alpha samples as (H, W, 4) RGBA."""
    return a[..., [0, 0, 0, 1]] if a.ndim == 3 and a.shape[2] == 2 else a


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, C) array, as ImageOps.exif_transpose does."""
    ops = {2: lambda x: x[:, ::-1], 3: lambda x: x[::-1, ::-1], 4: lambda x: x[::-1],
           5: lambda x: x.transpose(1, 0, 2), 6: lambda x: np.rot90(x, -1), 7: lambda x: np.rot90(x, -1)[::-1],
           8: lambda x: np.rot90(x, 1)}  # fmt: skip
    return np.ascontiguousarray(ops[orientation](a)) if orientation in ops else a


def pil_to_array(img: Image.Image, *, keep_alpha: bool = False, name: str = "the image") -> np.ndarray:
    """An opened PIL image as (H, W, 3), as `read_image` gives a file's pixels (EXIF orientation aside; ``keep_alpha`` as there).

    ``keep_alpha`` (a mask's reading) also keeps a grey image (H, W): its labels need no colour channels. Samples
    outside what their mode can mean here (floats outside [0, 1], 32-bit integers past 16 bits) are an `ImageError`
    naming ``name``.
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PNG/TIFF): keep the precision instead of going through 8 bits.
        a = _check_int_range(np.asarray(img), name)
        return a if keep_alpha else np.repeat(a[..., None], 3, axis=2)
    if keep_alpha and mode in ("L", "1"):  # a grey mask as its values: a third of the memory of RGB, the same labels
        return np.asarray(img if mode == "L" else img.convert("L"))
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        check_float_range(a, name)
        a = np.clip(a, 0, 1)
        return np.repeat(a[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha and keep_alpha:
        return clear_transparent(np.array(img.convert("RGBA")))
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img if mode == "RGB" else img.convert("RGB"))


def resize_long_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (3, H, W) so its long side is ``size`` (antialiased bicubic); 0 keeps it."""
    h, w = img.shape[-2:]
    if size <= 0 or max(h, w) == size:
        return img
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if nw == 1 < nh:  # torch 2.13's CPU kernel returns one flat colour for an output 1 wide; 1 high is right: transposed
        out = F.interpolate(img[None].transpose(-1, -2), size=(nw, nh), mode="bicubic", antialias=True, align_corners=False)
        return out[0].transpose(-1, -2).clamp(0, 1)
    out = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


JPEG_QUALITY = 95  # of JPEG outputs, with Pillow's default 4:2:0 chroma (`io.pyramid.write_jpeg_bands` matches it)


def save_image(img: torch.Tensor, path: str | Path, fmt: str = "png", depth: int = 8) -> Path:
    """Write (3, H, W) in [0, 1] (clamped) atomically; ``depth`` 16 for png/tiff."""
    dtype = np.uint8 if depth == 8 else np.uint16
    a = (img.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * sample_peak(dtype) + 0.5).astype(dtype)
    return save_array(np.ascontiguousarray(a), path, fmt)  # imagecodecs' PNG encoder refuses strided arrays


def save_array(a: np.ndarray, path: str | Path, fmt: str = "png", *, png_level: int = DEFAULT_PNG_LEVEL,
               meta: OutputMeta | None = None) -> Path:  # fmt: skip
    """Write an (H, W, 3) uint8 or uint16 array: temp file in the same folder, then rename.

    16-bit goes to TIFF (tifffile, deflate) or PNG (imagecodecs); JPEG is 8-bit only. ``meta``: the resolution and
    EXIF to write (`io.metadata`).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ImageError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if a.dtype == np.uint16 and fmt == "jpg":
        raise ImageError(f"{path}: JPEG cannot hold 16-bit samples; write PNG or TIFF for 16-bit outputs")
    encoding = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:  # the temp is removed on any failure, Ctrl-C included
            encoding = True
            _encode(a, f, fmt, png_level, meta)
    except OSError as exc:
        if not encoding:
            raise ImageError(f"{path.parent}: cannot write to the output directory ({exc.strerror or exc})") from exc
        raise ImageError(f"{path}: cannot write the image ({exc.strerror or exc})") from exc
    return path


class _ThroughWrite:
    """File ``f`` without its descriptor, so that Pillow writes through ``f.write``, which raises on a full disk.

    Given a descriptor, Pillow's C encoders (JPEG, TIFF) write to it directly and ignore a short write: a full disk
    gave a truncated file, "done", and no error.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def pil_save(img: Image.Image, dest: str | Path | BinaryIO, fmt: str, **kwargs: Any) -> None:
    """``img.save(dest, fmt, **kwargs)``, where a full disk raises ``OSError`` (ENOSPC) rather than leaving a truncated file."""
    if isinstance(dest, (str, Path)):
        with open(dest, "wb") as f:
            img.save(_ThroughWrite(f), fmt, **kwargs)
    else:
        img.save(_ThroughWrite(dest), fmt, **kwargs)


def _encode(a: np.ndarray, f, fmt: str, png_level: int = DEFAULT_PNG_LEVEL, meta: OutputMeta | None = None) -> None:
    if fmt == "png":  # 8- and 16-bit through libpng (imagecodecs); PIL truncates 16-bit RGB
        import imagecodecs

        # Level 1 with the RLE strategy and the SUB filter (libpng's fast settings): 2x faster than
        # PIL's level 1, files 6% larger (benchmarks/codecs.py: 0.13 vs 0.27 s at 4 MP).
        fast = {"strategy": 3, "filter": 16} if png_level == 1 else {}
        data = imagecodecs.png_encode(np.ascontiguousarray(a), level=png_level, **fast)
        f.write(meta.into_png(data) if meta is not None else data)
        return
    if a.dtype == np.uint16:
        import tifffile

        tifffile.imwrite(f, a, photometric="rgb", compression="zlib", **(meta.tiff_tags() if meta else {}))
        return
    kwargs: dict[str, Any] = {"jpg": {"quality": JPEG_QUALITY}}.get(fmt, {})
    if meta is not None and fmt == "jpg":
        kwargs.update(meta.pil_jpeg())
    elif meta is not None and meta.dpi is not None:  # TIFF: the resolution
        kwargs["dpi"] = meta.dpi
    pil_save(Image.fromarray(a, "RGB"), f, FORMATS[fmt], **kwargs)
