"""Content images read as bands of rows through libvips, never whole, resized on the way.

`read_image` decodes a whole file (a 1 gigapixel JPEG is 3 GB of uint8, and its
resize a float32 copy four times that). `open_stream` reads the same pixels a
band at a time: libvips (pyvips, the ``vips`` extra) decodes JPEG, PNG,
TIFF/BigTIFF and WebP sequentially, and `core.resample.RowResampler` applies
`resize_long_side`'s filter to the rows as they come. The bands equal what
`read_image` (+ `resize_long_side`) returns: the colour conversions are
Pillow's own, and so is the colour profile's (`io.profiles`), applied per band (tests/test_stream.py).

Not streamed (`stream_blocker` says why, and the caller reads the file whole):
EXIF-rotated images (a rotation needs every row first), interlaced PNG, TIFFs
of compressions libvips may lack (`STREAMED_TIFF_COMPRESSIONS`), images whose
layout this module does not convert (e.g. Lab TIFF). An in-memory image
(`ArrayStream`) is resized the same way, band by band, where its whole resize
would not fit.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ultrastyle.core.canvas import sample_peak
from ultrastyle.core.resample import RowResampler, resized_size
from ultrastyle.errors import warn
from ultrastyle.io.images import AnimatedImageWarning, ImageError, check_float_range, check_pixels, check_png_data, check_tiff_data, tiff_pages
from ultrastyle.io.profiles import srgb_converter, unconverted
from ultrastyle.io.sources import ImageInput

BAND_ROWS = 256  # rows per band at most
BAND_BYTES = 16 * 2**20  # float32 bytes per band at most: a wide image gets fewer rows (a 1 GP image's 31.6k: 44)


def band_rows(width: int) -> int:
    """Rows per band for an image ``width`` pixels wide: `BAND_ROWS`, fewer where a float32 band would pass `BAND_BYTES`."""
    return max(8, min(BAND_ROWS, BAND_BYTES // (width * 3 * 4)))


def vips_available() -> bool:
    """Whether pyvips and a libvips it can load are installed (``pip install 'ultrastyle[vips]'``)."""
    if importlib.util.find_spec("pyvips") is None:
        return False
    try:
        vips_module()  # its import loads libvips (the pyvips-binary wheel or the system's)
    except (ImportError, OSError):
        return False
    return True


def vips_missing() -> str | None:
    """Why libvips cannot be used here (pyvips not installed, or a libvips it cannot load), or None when it can."""
    if vips_available():
        return None
    return _NO_PYVIPS if importlib.util.find_spec("pyvips") is None else "pyvips cannot load libvips"


_NO_PYVIPS = "pyvips is not installed"


@functools.cache
def vips_module() -> Any:
    """The pyvips module, with libvips' operation cache off.

    The cache keeps each opened file by its name. A file replaced at the same path (a service's upload slot) gave
    the old file's pixels, and the descriptors and memory of deleted files stayed held (measured: 18 descriptors and
    +105 MB over 20 uploads). Each file is opened once or twice here: the cache saves nothing.
    """
    import pyvips as module

    module.cache_set_max(0)
    return module


_FORMATS = {"uchar": np.uint8, "ushort": np.uint16, "float": np.float32}
# TIFF compressions every libtiff decodes (none, CCITT, LZW, JPEG, Deflate, PackBits). For others (zstd, LZMA, WebP,
# JPEG-XL...) libvips' libtiff may lack the codec, and then it returned rows of zeros without an error (measured:
# pyvips-binary 8.16, zstd): those files are read whole, where tifffile's codecs decode them.
STREAMED_TIFF_COMPRESSIONS = frozenset({1, 2, 3, 4, 5, 7, 8, 32773, 32946})


class ImageStream:
    """One content file read top to bottom in bands.

    ``size``: (H, W) of the bands (after ``content_size``); ``original``: (H, W) of the file; ``dtype``: the bands'
    sample type: uint8 / uint16 as the file holds them, float32 in [0, 1] when resized or a float TIFF.
    """

    def __init__(self, path: Path, image: object, content_size: int) -> None:
        self.path = path
        self._image = image
        h, w = image.height, image.width  # type: ignore[attr-defined]
        self.original = (h, w)
        self.size = resized_size(h, w, content_size)
        self._fmt = image.format  # type: ignore[attr-defined]
        native = _FORMATS[self._fmt]
        self.dtype = np.dtype(np.float32 if self.size != self.original else native)
        self._mode = _mode_of(image)
        # The file's colour profile, as a whole read applies it: 8-bit pixels converted band by band, others warned of.
        icc = image.get("icc-profile-data") if "icc-profile-data" in image.get_fields() else None  # type: ignore[attr-defined]
        self._to_srgb = srgb_converter(icc, self._mode, str(path)) if native == np.uint8 else None
        if native != np.uint8 and self._mode in ("RGB", "RGBA"):
            unconverted(icc, str(path))

    def bands(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, W, 3) array) from the top (``rows`` None: `band_rows`); a decoding error is an
        `ImageError` naming the file."""
        pyvips = vips_module()

        rows = rows or band_rows(self.original[1])
        try:
            yield from _resized(self._decoded(rows), self.original, self.size, rows)
        except pyvips.Error as exc:
            raise ImageError(f"{self.path}: truncated or corrupt image data ({_first_line(exc)})") from None

    def _decoded(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, W, 3)) of the file as `read_image` converts it, at its own size."""
        pyvips = vips_module()

        h, w = self.original
        region = pyvips.Region.new(self._image)
        for r0 in range(0, h, rows):
            n = min(rows, h - r0)
            raw = np.frombuffer(region.fetch(0, r0, w, n), dtype=_FORMATS[self._fmt])
            if raw.dtype.kind == "f":  # as a whole read refuses them: clipped 0..255 floats would be white
                check_float_range(raw, str(self.path))
            band, mode = raw.reshape(n, w, -1), self._mode
            if self._to_srgb is not None:
                band = np.asarray(self._to_srgb(Image.fromarray(band, mode)))
                mode = "RGBA" if mode == "RGBA" else "RGB"
            yield r0, _to_rgb(band, mode)


def _resized(bands: Iterator[tuple[int, np.ndarray]], original: tuple[int, int], size: tuple[int, int],
             rows: int) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """``bands`` of an image of ``original`` (H, W), resized to ``size`` by `RowResampler` (as [0, 1] float32) unless
    that is its own size: the one resize of files and in-memory images alike."""
    if size == original:
        yield from bands
        return
    resampler = RowResampler(*original, *size, band=rows)
    for _, rgb in bands:
        peak = sample_peak(rgb.dtype)
        yield from resampler.push(rgb.astype(np.float32) / np.float32(peak) if peak != 1 else rgb)


class ArrayStream:
    """An in-memory image (`ImageInput`) resized to ``content_size`` a band of rows at a time, as `ImageStream` resizes a
    file: its float copy and the whole-image resize (12 bytes a pixel and more) are never made."""

    def __init__(self, src: ImageInput, content_size: int) -> None:
        self.path = str(src)
        self._pixels = src.pixels
        h, w = self._pixels.shape[:2]
        self.original = (h, w)
        self.size = resized_size(h, w, content_size)
        self.dtype = np.dtype(np.float32 if self.size != self.original else self._pixels.dtype)

    def bands(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, (rows, W, 3) array) from the top, as `ImageStream.bands`."""
        rows = rows or band_rows(self.original[1])
        own = ((r0, self._pixels[r0 : r0 + rows]) for r0 in range(0, self.original[0], rows))
        yield from _resized(own, self.original, self.size, rows)


def open_array_stream(src: ImageInput, *, max_pixels: int, content_size: int = 0) -> ArrayStream:
    """`ArrayStream` of ``src`` after checking its size against ``max_pixels`` (`ImageError` naming it)."""
    h, w = src.pixels.shape[:2]
    check_pixels(str(src), w, h, max_pixels)
    return ArrayStream(src, content_size)


def _first_line(exc: Exception) -> str:
    text = str(getattr(exc, "detail", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _mode_of(image: object) -> str:
    """Pillow's name for the file's layout, which `_to_rgb` converts the same way."""
    bands, interp, fmt = image.bands, image.interpretation, image.format  # type: ignore[attr-defined]
    if fmt not in _FORMATS:
        raise ValueError(f"{fmt} samples")
    if interp == "cmyk" and bands == 4 and fmt == "uchar":
        return "CMYK"
    if interp in ("b-w", "grey16") or bands in (1, 2):
        return {1: "L", 2: "LA"}.get(bands, "?")
    if interp in ("srgb", "rgb16", "rgb", "scrgb") and bands in (3, 4):
        return {3: "RGB", 4: "RGBA"}[bands]
    raise ValueError(f"{interp} with {bands} bands")


def _to_rgb(a: np.ndarray, mode: str) -> np.ndarray:
    """(rows, W, bands) in the file's layout -> (rows, W, 3) as `read_image` converts it (Pillow's conversions)."""
    if a.dtype == np.uint8 and mode in ("CMYK", "LA", "RGBA"):
        img = Image.fromarray(np.ascontiguousarray(a), mode)
        if mode == "CMYK":
            return np.asarray(img.convert("RGB"))
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, img.convert("RGBA")).convert("RGB"))
    if mode in ("LA", "RGBA"):  # 16-bit or float with alpha: over white in float, as `_read_rgb16` does
        peak = 65535 if a.dtype == np.uint16 else 1
        colour = a[..., :-1].astype(np.float32)
        alpha = a[..., -1:].astype(np.float32) / peak
        out = colour * alpha + peak * (1 - alpha)
        a = (out + 0.5).astype(np.uint16) if a.dtype == np.uint16 else out.astype(np.float32)
        mode = mode[:-1]
    if a.dtype.kind == "f":  # float samples are read as [0, 1], clipped as a whole read clips them (`pil_to_array`)
        a = np.clip(a, 0, 1)
    if mode in ("L", "LA"):
        return np.repeat(a[..., :1], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def stream_blocker(path: str | Path) -> str | None:
    """Why ``path`` cannot be streamed (read whole instead), or None when it can; never raises."""
    if (why := vips_missing()) is not None:
        fix = "pip install 'ultrastyle[vips]'" + ("" if why == _NO_PYVIPS else " installs it with pyvips-binary")
        return f"{why} ({fix})"
    pyvips = vips_module()

    try:
        image = pyvips.Image.new_from_file(str(path))  # the header only
        if (why := _unstreamed_loader(image)) is not None:
            return why
        fields = set(image.get_fields())
        if "orientation" in fields and image.get("orientation") not in (0, 1):
            return "its EXIF orientation turns it, which needs every row first"
        if image.get("vips-loader").startswith("png") and "interlaced" in fields and image.get("interlaced"):
            return "an interlaced PNG cannot be decoded a band at a time"
        if image.get("vips-loader").startswith("tiff") and (scheme := _tiff_compression(Path(path))) not in STREAMED_TIFF_COMPRESSIONS:
            return f"its TIFF compression ({scheme}) is not one libvips is sure to decode a band at a time"
        _mode_of(image)
    except (pyvips.Error, ValueError) as exc:
        return f"libvips cannot stream it ({_first_line(exc)})"
    return None


STREAMED_FORMATS = ("jpeg", "png", "tiff", "webp", "gif")  # libvips loaders "{format}load": formats a whole read takes too


def _unstreamed_loader(image: object) -> str | None:
    """Why libvips' loader for ``image`` is not one to stream through: libvips also renders SVG (fetching files it
    names), PDF, HEIF and more, which no whole read takes: untrusted files stay with the documented decoders."""
    loader = str(image.get("vips-loader"))  # type: ignore[attr-defined]
    return None if loader.split("load")[0] in STREAMED_FORMATS else f"libvips reads it with {loader}; JPEG, PNG, TIFF, WebP and GIF are streamed"


def _tiff_compression(path: Path) -> int | str:
    """The first image's compression tag of a TIFF (its directory only), or "unknown"."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.pages.first.compression)
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, AttributeError):
        return "unknown"


def open_stream(path: str | Path, *, max_pixels: int, content_size: int = 0) -> ImageStream:
    """Open ``path`` for `ImageStream.bands` after checking its header (size against ``max_pixels``, PNG data length).

    Raises `ImageError` naming the file and the cause; warns (`AnimatedImageWarning`) that an animation's first
    frame is used. Call `stream_blocker` first: a file it names is not handled here.
    """
    pyvips = vips_module()

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
    except pyvips.Error as exc:
        raise ImageError(f"{path}: not an image file libvips can read ({_first_line(exc)})") from None
    if (why := _unstreamed_loader(image)) is not None:
        raise ImageError(f"{path}: not streamed: {why}")
    check_pixels(path, image.width, image.height, max_pixels)
    loader = image.get("vips-loader")
    if loader.startswith("png"):
        check_png_data(path)
    elif loader.startswith("tiff"):
        check_tiff_data(path)
    fields = set(image.get_fields())
    pages = image.get("n-pages") if "n-pages" in fields else 1
    if pages > 1 and loader.split("load")[0] in ("gif", "webp", "png", "heif"):
        warn(f"{path}: an animation of {pages} frames; its first frame is used", AnimatedImageWarning)
    elif loader.startswith("tiff") and (pages := tiff_pages(path)) > 1:  # a pyramid's reduced levels are not pages
        warn(f"{path}: a TIFF of {pages} pages; its first page is used", AnimatedImageWarning)
    return ImageStream(path, image, content_size)


__all__ = ["AnimatedImageWarning", "ArrayStream", "BAND_BYTES", "BAND_ROWS", "band_rows", "ImageStream", "open_array_stream", "open_stream",
           "stream_blocker", "vips_available"]  # fmt: skip
