"""Zoomable outputs written band by band: Deep Zoom pyramids (with an offline viewer page) and pyramidal TIFF.

A gigapixel result is not one image file anyone opens whole; it is looked at
in a zoomable viewer that loads the tiles of the level it shows. Both writers
here take the stylized image as a `Canvas` (or an (H, W, 3) array) and read it
``TILE`` rows at a time, so the uint8 image never exists whole in memory:

- ``dzi``: ``NAME.dzi`` (the Deep Zoom XML), ``NAME_files/<level>/<col>_<row>.jpg|png``
  (254-pixel tiles with a 1-pixel overlap, levels down to 1x1, level numbers
  counting up from the 1x1 one as the convention has it) and ``NAME.html``, a
  self-contained page that shows the pyramid offline (`io.viewer`).
- ``tiff`` with the pyramid layout: a tiled (256 x 256) TIFF, BigTIFF when it
  could pass 4 GB, its reduced levels (each half the previous, down to one
  tile) in SubIFDs of the full-size page, as libvips and OME write them;
  deflate, zstd or jpeg compression.

Every level is computed from the one above it as it streams past (2 x 2 box
means, an odd last row or column repeated), so each level holds only a band.
A TIFF must store its levels one after the other, so the reduced ones go to
an unlinked scratch file beside the output (a third of the full level's size)
until the full level is written.

Atomic as every output: the tile folder and the TIFF are written under this
tool's temp names (`io.atomic`) and renamed when complete; the ``.dzi`` is
written last, so its presence means the pyramid is whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from ultrastyle.core.canvas import Canvas, read_at, sample_peak, write_at
from ultrastyle.io.atomic import atomic_dir, atomic_path, atomic_write, remove_tree
from ultrastyle.io.constants import OUTPUT_FORMATS
from ultrastyle.io.images import DEFAULT_PNG_LEVEL, FORMATS, JPEG_QUALITY, PNG_SIGNATURE, ImageError, pil_save, save_array
from ultrastyle.io.metadata import OutputMeta, png_chunk
from ultrastyle.io.sources import content_meta
from ultrastyle.io.stream import vips_available, vips_module
from ultrastyle.io.viewer import PAGE

__all__ = [
    "DZI_OVERLAP", "DZI_TILE", "OUTPUT_FORMATS", "check_output_size", "Pixels", "PyramidOptions", "TIFF_TILE", "dzi_levels",
    "save_output", "streams", "tiff_levels", "write_dzi", "write_jpeg_bands", "write_png_bands", "write_tiff_pyramid",
    "write_tiff_strips",
]  # fmt: skip

Pixels = Union[np.ndarray, Canvas]  # (H, W, 3) uint8/uint16, or a (3, H, W) float canvas in [0, 1]

assert OUTPUT_FORMATS == (*FORMATS, "dzi")  # its one definition is torch-free, for option checks



DZI_TILE, DZI_OVERLAP = 254, 1  # 254 + 2 x 1 overlap = 256-pixel images, the Deep Zoom default
TIFF_TILE = 256
TIFF_COMPRESSIONS = {"deflate": "zlib", "zstd": "zstd", "jpeg": "jpeg"}  # our names -> tifffile's
TIFF_LAYOUTS = ("auto", "plain", "pyramid")
DZI_TILE_FORMATS = ("jpg", "png")
# "auto" writes a plain TIFF (one image, as before) up to this long side, a tiled pyramid above it.
TIFF_PYRAMID_SIDE = 8192
# Reduced TIFF levels up to this many bytes stay in RAM; larger ones go to a scratch file.
_SPILL_BYTES = 64 * 2**20
# Tiles tifffile takes from our bands and compresses in one pass (its default, 512 MB, would hold
# that much of the image in memory at once).
_ENCODE_BYTES = 32 * 2**20
# PNG outputs above this many raw bytes (8-bit) are encoded band by band (`write_png_bands`) instead of whole
# through libpng: about 22 MP, where the whole uint8 image and its encoded copy start to weigh on a 1 GB budget.
PNG_STREAM_BYTES = 64 * 2**20
# BigTIFF once the raw pixels (all levels) come near classic TIFF's 4 GB offsets; compressed data can
# exceed the raw size slightly (noise under deflate), hence the margin.
_BIGTIFF_AT = 2**32 - 2**28


@dataclass(frozen=True)
class PyramidOptions:
    """How zoomable outputs are written.

    ``tiff_layout``: "plain" (one image in strips), "pyramid" (tiled, with
    reduced levels), "auto" (a pyramid when the long side is above
    `TIFF_PYRAMID_SIDE` or the compression is jpeg). ``tiff_compression``:
    "deflate", "zstd" (either layout) or "jpeg" (8-bit pyramids only). ``dzi_tile_format``: "jpg" or
    "png" (lossless). ``jpeg_quality``: of JPEG tiles (1-100).
    """

    tiff_layout: str = "auto"
    tiff_compression: str = "deflate"
    dzi_tile_format: str = "jpg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.tiff_layout not in TIFF_LAYOUTS:
            raise ValueError(f"tiff_layout must be one of {', '.join(TIFF_LAYOUTS)}, got {self.tiff_layout!r}")
        if self.tiff_compression not in TIFF_COMPRESSIONS:
            raise ValueError(f"tiff_compression must be one of {', '.join(TIFF_COMPRESSIONS)}, got {self.tiff_compression!r}")
        if self.tiff_layout == "plain" and self.tiff_compression == "jpeg":
            raise ValueError("tiff_compression jpeg is for pyramidal TIFFs (tiles); a plain TIFF takes deflate or zstd")
        if self.dzi_tile_format not in DZI_TILE_FORMATS:
            raise ValueError(f"dzi_tile_format must be one of {', '.join(DZI_TILE_FORMATS)}, got {self.dzi_tile_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {self.jpeg_quality}")

    def tiff_pyramid(self, height: int, width: int) -> bool:
        """Whether a ``height`` x ``width`` TIFF output is written as a tiled pyramid (JPEG compression: always, it is tiled)."""
        auto = max(height, width) > TIFF_PYRAMID_SIDE or self.tiff_compression == "jpeg"
        return self.tiff_layout == "pyramid" or (self.tiff_layout == "auto" and auto)


def streams(fmt: str, height: int, width: int, options: PyramidOptions) -> bool:
    """True where an output of this format and size is written from the canvas band by band: dzi and pyramidal
    tiff always; PNG, plain TIFF and JPEG (with libvips) above `PNG_STREAM_BYTES` of 8-bit pixels."""
    if fmt == "dzi" or (fmt == "tiff" and options.tiff_pyramid(height, width)):
        return True
    large = height * width * 3 > PNG_STREAM_BYTES
    return large and (fmt in ("png", "tiff") or (fmt == "jpg" and vips_available()))


def output_meta(content: object, out: Pixels, policy: str) -> OutputMeta | None:
    """What the output ``out`` of ``content`` keeps of its metadata (`io.metadata.content_meta`; ``policy`` one of `METADATA`)."""
    h, w = image_size(out)
    return content_meta(content, h, w, policy)  # type: ignore[arg-type]


def image_size(src: Pixels) -> tuple[int, int]:
    """(H, W) of an (H, W, 3) array or a (3, H, W) canvas."""
    return (src.shape[1], src.shape[2]) if isinstance(src, Canvas) else (src.shape[0], src.shape[1])


def save_output(
    src: Pixels, path: str | Path, fmt: str, *, depth: int = 8, png_level: int = DEFAULT_PNG_LEVEL,
    pyramid: PyramidOptions = PyramidOptions(), meta: OutputMeta | None = None,
) -> Path:
    """Write ``src`` as ``fmt`` at ``path``: zoomable formats band by band, the others through `images.save_array`.

    ``src``: (H, W, 3) uint8/uint16, or a [0, 1] canvas converted to ``depth``
    bits as `runtime.tiled.canvas_to_image` does (a whole-image format then
    converts it whole). The caller keeps ownership of a canvas. ``meta``: the
    resolution and EXIF to write (`io.metadata`; Deep Zoom takes none). Returns
    ``path``; raises `ImageError` naming it.
    """
    path = Path(path)
    h, w = image_size(src)
    dtype = np.uint8 if depth == 8 else np.uint16
    if fmt == "dzi":
        return write_dzi(src, path, pyramid)
    if fmt == "tiff" and pyramid.tiff_pyramid(h, w):
        return write_tiff_pyramid(src, path, pyramid, dtype=dtype, meta=meta)
    if fmt == "tiff":  # plain: strips, compressed as asked (the same bytes from an array or a canvas's bands)
        bands = _bands(src, dtype, 256) if isinstance(src, Canvas) else [np.asarray(src, dtype)]
        return write_tiff_strips(bands, path, h, w, dtype, compression=pyramid.tiff_compression, meta=meta)
    # A canvas's PNG always leaves band by band (the same bytes whatever its size); JPEG when large.
    if isinstance(src, Canvas) and (fmt == "png" or streams(fmt, h, w, pyramid)):
        bands = _bands(src, dtype, 256)
        if fmt == "png":
            return write_png_bands(bands, path, h, w, dtype, level=png_level, meta=meta)
        return write_jpeg_bands(bands, path, h, w, quality=JPEG_QUALITY, meta=meta)
    a = src if isinstance(src, np.ndarray) else np.concatenate(list(_bands(src, dtype, 512)), axis=0)
    return save_array(a, path, fmt, png_level=png_level, meta=meta)


# --- PNG, band by band ----------------------------------------------------------------------------


def write_png_bands(
    bands: Iterable[np.ndarray], path: str | Path, height: int, width: int, dtype: type = np.uint8, *, level: int = DEFAULT_PNG_LEVEL,
    meta: OutputMeta | None = None,
) -> Path:
    """Write (rows, W, 3) ``bands`` (top to bottom, ``height`` rows in all) as an RGB PNG, atomically, never whole.

    Every row is SUB-filtered (its bytes minus those one pixel to the left, as libpng's fast setting) and fed
    to one zlib stream (level ``level``, run-length strategy at level 1), whose output leaves in IDAT chunks
    as it comes: memory is one band. The bytes do not depend on how the rows are cut into bands.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            extra = meta.png_chunks() if meta is not None else b""
            for chunk in _png_stream(bands, height, width, dtype, level=level, sub_filter=True, label=f"{path}: ", extra=extra):
                f.write(chunk)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the image ({exc.strerror or exc})") from exc
    return path


def _png_stream(
    bands: Iterable[np.ndarray], height: int, width: int, dtype: type, *, level: int, sub_filter: bool, label: str = "",
    extra: bytes = b"",
) -> Iterator[bytes]:
    """The bytes of an RGB PNG of ``bands``, in pieces of about 1 MB of compressed data (one IDAT chunk each).

    ``sub_filter``: every row SUB-filtered (`write_png_bands`), else unfiltered (with ``level`` 0, the
    cheapest PNG to make: stored deflate blocks). ``label`` prefixes the error for a wrong row count; ``extra``: chunks
    after IHDR (`io.metadata.OutputMeta.png_chunks`).
    """
    depth = 16 if np.dtype(dtype) == np.uint16 else 8
    bpp = 3 * depth // 8
    strategy = zlib.Z_RLE if level == 1 else zlib.Z_DEFAULT_STRATEGY
    yield PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)) + extra
    z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    pending, rows = bytearray(), 0
    for band in bands:
        raw = np.ascontiguousarray(band, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8).reshape(len(band), width * bpp)
        filtered = np.empty((len(band), width * bpp + 1), np.uint8)
        if sub_filter:
            filtered[:, 0] = 1  # filter type SUB
            filtered[:, 1 : 1 + bpp] = raw[:, :bpp]
            np.subtract(raw[:, bpp:], raw[:, :-bpp], out=filtered[:, 1 + bpp :])  # wraps mod 256, as PNG wants
        else:
            filtered[:, 0] = 0  # filter type None
            filtered[:, 1:] = raw
        pending += z.compress(filtered.tobytes())
        rows += len(band)
        if len(pending) >= 1 << 20:
            yield png_chunk(b"IDAT", bytes(pending))
            pending.clear()
    if rows != height:
        raise ValueError(f"{label}the bands held {rows} rows, the header says {height}")
    pending += z.flush()
    yield png_chunk(b"IDAT", bytes(pending)) + png_chunk(b"IEND", b"")


# --- plain TIFF and JPEG, band by band -------------------------------------------------------------

# libjpeg's own limit (JPEG_MAX_DIMENSION), below the format's 65535: Pillow and libvips both refuse a side above it, and
# only when they write (measured: 65500 writes, 65501 fails with "Maximum supported image dimension is 65500 pixels").
JPEG_MAX_SIDE = 65500
# Plain TIFF strips: about this many bytes each (whole rows), as libtiff's writers keep strips small.
_STRIP_BYTES = 2**20


def write_tiff_strips(
    bands: Iterable[np.ndarray], path: str | Path, height: int, width: int, dtype: type = np.uint8, *,
    compression: str = "deflate", meta: OutputMeta | None = None,
) -> Path:
    """Write (rows, W, 3) ``bands`` as a plain (untiled) RGB TIFF, atomically, never whole: tifffile, strips of ~1 MB.

    ``compression``: "deflate" or "zstd" per strip. BigTIFF where the pixels
    could pass 4 GB. The strips are cut from the rows whatever the bands, so
    the bytes do not depend on them.
    """
    import tifffile

    if compression not in ("deflate", "zstd"):
        raise ValueError(f"a plain TIFF takes deflate or zstd, not {compression!r}")
    if compression == "zstd":
        import imagecodecs

        encode = imagecodecs.zstd_encode
    else:
        encode = functools.partial(zlib.compress, level=6)
    path = Path(path)
    dt = np.dtype(dtype)
    row_bytes = width * 3 * dt.itemsize
    per_strip = max(1, _STRIP_BYTES // row_bytes)

    def strips() -> Iterator[bytes]:
        pending: list[np.ndarray] = []  # rows of the strip being filled
        held = rows = 0
        for band in bands:
            band = np.ascontiguousarray(band, dt)
            while len(band):
                take = min(len(band), per_strip - held)
                pending.append(band[:take])
                band = band[take:]
                held += take
                rows += take
                if held == per_strip or rows == height:
                    raw = b"".join(b.tobytes() for b in pending)
                    pending.clear()
                    held = 0
                    yield encode(raw)
        if rows != height:
            raise ValueError(f"{path}: the bands held {rows} rows, the header says {height}")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=height * row_bytes > _BIGTIFF_AT) as tif:
            tif.write(strips(), shape=(height, width, 3), dtype=dt, photometric="rgb", rowsperstrip=per_strip,
                      compression=TIFF_COMPRESSIONS[compression], metadata=None, **(meta.tiff_tags() if meta else {}))  # fmt: skip
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the image ({exc.strerror or exc})") from exc
    return path


def write_jpeg_bands(bands: Iterable[np.ndarray], path: str | Path, height: int, width: int, *, quality: int = JPEG_QUALITY,
                     meta: OutputMeta | None = None) -> Path:  # fmt: skip
    """Write (rows, W, 3) uint8 ``bands`` as a JPEG, atomically, never whole (libvips: the `vips` extra).

    libvips encodes rows as they come: the bands reach it as an uncompressed
    PNG stream (stored deflate blocks: no compression work), read
    sequentially. The settings are Pillow's (``quality``, 4:2:0 chroma), so
    the decoded pixels equal those of a JPEG Pillow would write
    (`tests/test_png_stream.py`).
    """
    pyvips = vips_module()

    path = Path(path)
    check_output_size(path, "jpg", height, width)
    failure: list[BaseException] = []
    source = _ByteSource(_png_stream(bands, height, width, np.uint8, level=0, sub_filter=False), failure)
    custom = pyvips.SourceCustom()
    custom.on_read(source.read)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            try:
                image = pyvips.Image.new_from_source(custom, "", access="sequential")
                keep = "none"
                if meta is not None and meta.dpi is not None:
                    image = image.copy(xres=meta.dpi[0] / 25.4, yres=meta.dpi[1] / 25.4)  # libvips counts pixels per mm
                if meta is not None and meta.exif is not None:
                    image = image.copy()
                    image.set_type(pyvips.GValue.blob_type, "exif-data", meta.exif)
                    keep = "exif"
                image.jpegsave(str(tmp), Q=quality, subsample_mode="on", keep=keep)
            except pyvips.Error as exc:
                if failure:  # the bands failed (a canvas read): that is the error, not libvips' end of data
                    raise failure[0] from exc
                cause = _vips_cause(exc)
                # libvips says a full disk in words only: the OSError it stands for goes with it (a batch stops on it)
                full = next((OSError(code, cause) for code in (errno.ENOSPC, errno.EDQUOT) if cause == os.strerror(code)), exc)
                raise ImageError(f"{path}: cannot write the image ({cause})") from full
            if failure:
                raise failure[0]
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the image ({exc.strerror or exc})") from exc
    return path


def _vips_cause(exc: Exception) -> str:
    """libvips' error in a few words: the system error it names (a full disk), else its first line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or ["unknown error"]
    system = [ln.split("system error:", 1)[1].strip() for ln in lines if "system error:" in ln]
    return system[0] if system else f"libvips: {lines[0]}"


def check_output_size(path: str | Path, fmt: str, height: int, width: int) -> None:
    """Raise `ImageError` naming ``path`` where ``fmt`` cannot hold a ``height`` x ``width`` image (JPEG: 65500 px a side, libjpeg's limit).

    Checked before an image is stylized, not after hours of tiles.
    """
    if fmt == "jpg" and max(height, width) > JPEG_MAX_SIDE:
        raise ImageError(f"{path}: JPEG holds at most {JPEG_MAX_SIDE} pixels a side, this image is {width}x{height}; write tiff or dzi")


class _ByteSource:
    """``read(size)`` over an iterator of byte strings, for libvips' custom sources; an error ends the data and is kept."""

    def __init__(self, chunks: Iterator[bytes], failure: list[BaseException]) -> None:
        self._chunks, self._failure = chunks, failure
        self._buf = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._buf) < size and not self._failure:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                break
            except BaseException as exc:  # noqa: BLE001 - raised again by the writer, after libvips stops
                self._failure.append(exc)
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


# --- reading an image band by band ------------------------------------------------------------


def _bands(src: Pixels, dtype: type, band: int) -> Iterator[np.ndarray]:
    """(rows, W, 3) blocks of ``src`` top to bottom, ``band`` rows each (the last one shorter), as ``dtype``.

    From a canvas: clamped, scaled and rounded with the float32 arithmetic of
    `runtime.tiled.canvas_to_image`, so the pixels equal a PNG output's; read
    in pieces of at most ~16 MB of float32, whatever the width.
    """
    h, w = image_size(src)
    peak = sample_peak(dtype)
    piece = max(1, min(band, 2**24 // (w * 3 * 4)))
    for r in range(0, h, band):
        if isinstance(src, np.ndarray):
            blk = src[r : r + band]
            yield blk if blk.dtype == dtype else blk.astype(dtype)
            continue
        out = np.empty((min(h, r + band) - r, w, 3), dtype)
        for p in range(r, min(h, r + band), piece):
            q = min(h, r + band, p + piece)
            if q < h:
                src.prefetch(slice(q, min(h, q + piece)), slice(None))
            t = torch.from_numpy(src.rows_band(p, q)).clamp_(0, 1).mul_(peak).add_(0.5).permute(1, 2, 0)
            if dtype == np.uint8:
                torch.from_numpy(out[p - r : q - r]).copy_(t)  # truncates, as numpy's astype does
            else:  # uint16: no torch dtype before 2.3
                out[p - r : q - r] = t.numpy().astype(dtype)
        yield out


def _halve(a: np.ndarray) -> np.ndarray:
    """(h, w, c) -> (ceil(h/2), ceil(w/2), c): rounded means of 2 x 2 blocks; an odd last row/column is repeated."""
    if a.shape[0] % 2:
        a = np.concatenate([a, a[-1:]], axis=0)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    s = a[0::2, 0::2].astype(np.uint32 if a.dtype == np.uint16 else np.uint16)  # 4 x 255 fits in 16 bits
    s += a[0::2, 1::2]
    s += a[1::2, 0::2]
    s += a[1::2, 1::2]
    s += 2
    s //= 4
    return s.astype(a.dtype)


class _Level:
    """One level of a pyramid, fed its rows top to bottom: hands them to ``sink`` and their halves to ``below``."""

    def __init__(self, sink: Callable[[np.ndarray], None], below: _Level | None) -> None:
        self.sink, self.below = sink, below
        self._odd: np.ndarray | None = None  # a last row waiting for its pair

    def push(self, rows: np.ndarray) -> None:
        self.sink(rows)
        if self.below is None:
            return
        if self._odd is not None:
            rows, self._odd = np.concatenate([self._odd, rows], axis=0), None
        even = rows.shape[0] - rows.shape[0] % 2
        if even < rows.shape[0]:
            self._odd = rows[even:].copy()
        for r in range(0, even, 128):  # in pieces: the widened sums stay small
            self.below.push(_halve(rows[r : min(even, r + 128)]))

    def finish(self) -> None:
        if self.below is None:
            return
        if self._odd is not None:
            self.below.push(_halve(self._odd))
            self._odd = None
        self.below.finish()


def _halved_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """(h, w) of ``levels`` levels, the full size first, each the ceiling of half the previous."""
    out = [(height, width)]
    for _ in range(levels - 1):
        h, w = out[-1]
        out.append(((h + 1) // 2, (w + 1) // 2))
    return out


# --- Deep Zoom --------------------------------------------------------------------------------


def dzi_levels(height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of every Deep Zoom level, level 0 (1 x 1) first, the full size last."""
    n = math.ceil(math.log2(max(height, width))) + 1
    return _halved_sizes(height, width, n)[::-1]


def _tile_span(i: int, size: int, tile: int, overlap: int) -> tuple[int, int]:
    """[start, stop) of tile ``i`` along an axis of ``size`` pixels: its ``tile`` pixels plus the overlap inside the image."""
    return max(0, i * tile - overlap), min(size, (i + 1) * tile + overlap)


class _DziTiler:
    """The sink of one Deep Zoom level: writes a row of tiles as soon as its rows (and the overlap below) have come."""

    def __init__(self, folder: Path, height: int, width: int, fmt: str, quality: int) -> None:
        self.folder, self.height, self.width, self.fmt, self.quality = folder, height, width, fmt, quality
        self.rows = math.ceil(height / DZI_TILE)
        self.cols = math.ceil(width / DZI_TILE)
        self._buf: np.ndarray | None = None
        self._start = 0  # image row of _buf[0]
        self._next = 0  # next tile row to write
        folder.mkdir()

    def __call__(self, rows: np.ndarray) -> None:
        self._buf = rows if self._buf is None else np.concatenate([self._buf, rows], axis=0)
        have = self._start + self._buf.shape[0]
        while self._next < self.rows and _tile_span(self._next, self.height, DZI_TILE, DZI_OVERLAP)[1] <= have:
            self._write_row(self._next)
            self._next += 1
            keep = min(have, _tile_span(self._next, self.height, DZI_TILE, DZI_OVERLAP)[0])
            self._buf = self._buf[keep - self._start :].copy()  # a copy: the old block is freed
            self._start = keep

    def _write_row(self, t: int) -> None:
        y0, y1 = _tile_span(t, self.height, DZI_TILE, DZI_OVERLAP)
        assert self._buf is not None
        band = self._buf[y0 - self._start : y1 - self._start]
        for c in range(self.cols):
            x0, x1 = _tile_span(c, self.width, DZI_TILE, DZI_OVERLAP)
            _write_tile(np.ascontiguousarray(band[:, x0:x1]), self.folder / f"{c}_{t}.{self.fmt}", self.fmt, self.quality)

    def check_done(self) -> None:
        if self._next != self.rows:  # a bug, not a bad file: every row was fed
            raise RuntimeError(f"{self.folder}: wrote {self._next} of {self.rows} tile rows")


def _write_tile(a: np.ndarray, path: Path, fmt: str, quality: int) -> None:
    if fmt == "png":
        import imagecodecs

        try:
            path.write_bytes(imagecodecs.png_encode(a, level=1))
        except imagecodecs.PngError:  # its output buffer is too small for some 1-px-wide noisy tiles: Pillow sizes its own
            pil_save(Image.fromarray(a), path, "PNG", compress_level=1)
    else:
        pil_save(Image.fromarray(a), path, "JPEG", quality=quality)


def dzi_xml(height: int, width: int, fmt: str) -> str:
    """The ``.dzi`` descriptor of a pyramid of this size and tile format."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" Overlap="{DZI_OVERLAP}" TileSize="{DZI_TILE}">\n'
        f'  <Size Width="{width}" Height="{height}"/>\n'
        "</Image>\n"
    )


def dzi_name(path: str | Path) -> str:
    """``NAME`` of a Deep Zoom descriptor ``NAME.dzi`` (or ``.xml``): its tiles are ``NAME_files/``, its page ``NAME.html``.

    As OpenSeadragon finds the tiles of a descriptor: only a lowercase ``.dzi``
    or ``.xml`` is taken off, so ``b.DZI`` has ``b.DZI_files/``.
    """
    name = Path(path).name
    return name[:-4] if name.endswith((".dzi", ".xml")) and len(name) > 4 else name


def viewer_html(name: str, height: int, width: int, fmt: str, dzi: str | None = None) -> str:
    """The offline viewer page of pyramid ``name`` (``dzi``, default ``name.dzi``; ``name_files/``): `io.viewer.PAGE` with its settings.

    The settings are in the page, not read from the ``.dzi``: browsers refuse
    to fetch files from a ``file://`` page, but load its images.
    """
    config = {
        "dzi": dzi or f"{name}.dzi", "files": f"{name}_files", "width": width, "height": height,
        "tileSize": DZI_TILE, "overlap": DZI_OVERLAP, "format": fmt, "maxLevel": len(dzi_levels(height, width)) - 1,
    }  # fmt: skip
    title = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    js = json.dumps(config).replace("</", "<\\/")  # a name cannot close the script element
    return PAGE.replace("__TITLE__", title).replace("__CONFIG__", js)


def write_dzi(src: Pixels, path: str | Path, options: PyramidOptions = PyramidOptions()) -> Path:
    """Write ``src`` (8-bit) as a Deep Zoom pyramid: ``path`` (``NAME.dzi``), ``NAME_files/`` and ``NAME.html``.

    ``src``: (H, W, 3) uint8 or a [0, 1] canvas, read `DZI_TILE`-row bands at a
    time. The ``.dzi``, the page and the tile folder are written under temp
    names first and renamed when all are complete, the ``.dzi`` last. Returns
    ``path``; raises `ImageError` naming it, leaving nothing new behind.
    """
    path = Path(path)
    name = dzi_name(path)
    h, w = image_size(src)
    if isinstance(src, np.ndarray) and src.dtype != np.uint8:
        raise ImageError(f"{path}: Deep Zoom tiles are 8-bit; got {src.dtype} samples")
    fmt = options.dzi_tile_format
    sizes = dzi_levels(h, w)
    old_tiles: list[Path] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The page and the .dzi are written first (a full disk fails before any tile) and renamed last, after the
        # tiles: the blocks exit innermost first. A failure while writing leaves no new file and an old output whole
        # (a failed rename after the old .dzi is gone leaves it incomplete, which skip_existing reruns). An old
        # output's tiles go after the new .dzi is in place: deleting 100k tiles takes a while, and a kill then would
        # leave neither output.
        with atomic_path(path) as dzi_tmp, atomic_path(path.with_name(f"{name}.html")) as html_tmp, \
                atomic_dir(path.with_name(f"{name}_files"), fsync=False, superseded=old_tiles, restorable=False) as tmp:
            dzi_tmp.write_text(dzi_xml(h, w, fmt), encoding="utf-8")
            html_tmp.write_text(viewer_html(name, h, w, fmt, path.name), encoding="utf-8")
            chain: _Level | None = None
            tilers = []
            for level, (lh, lw) in enumerate(sizes):  # 1 x 1 first: each level feeds the one before it
                tilers.append(_DziTiler(tmp / str(level), lh, lw, fmt, options.jpeg_quality))
                chain = _Level(tilers[-1], chain)
            assert chain is not None
            for band in _bands(src, np.uint8, DZI_TILE):
                chain.push(band)
            chain.finish()
            for t in tilers:
                t.check_done()
            _sync_filesystem(tmp)  # one flush for every tile, before the rename exposes them
            path.unlink(missing_ok=True)  # an old .dzi never points at the new tiles, even after a crash right here
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the Deep Zoom pyramid ({exc.strerror or exc})") from exc
    for old in old_tiles:
        with contextlib.suppress(OSError):  # left under a temp name: a later sweep removes it
            remove_tree(old)
    return path


def _sync_filesystem(folder: Path) -> None:
    """Flush the filesystem holding ``folder`` (Linux syncfs; elsewhere everything): thousands of tiles, one call.

    Not on Windows, which opens no folder this way and has no os.sync: its tiles are not flushed before the rename."""
    if os.name == "nt" or not hasattr(os, "sync"):
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    except (OSError, AttributeError):
        os.sync()
    finally:
        os.close(fd)


# --- pyramidal TIFF ---------------------------------------------------------------------------


def tiff_levels(height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of a pyramidal TIFF's levels, full size first, halving until one `TIFF_TILE` tile holds a level."""
    n = 1
    while max(_halved_sizes(height, width, n)[-1]) > TIFF_TILE:
        n += 1
    return _halved_sizes(height, width, n)


class _Spill:
    """A reduced level kept until its turn: (h, w, 3) in RAM when small, else in an unlinked file beside the output."""

    def __init__(self, height: int, width: int, dtype: type, folder: Path) -> None:
        self.shape, self.dtype = (height, width, 3), np.dtype(dtype)
        self.row_bytes = width * 3 * self.dtype.itemsize
        self._ram: np.ndarray | None = None
        self._file = None
        if height * self.row_bytes <= _SPILL_BYTES:
            self._ram = np.empty(self.shape, self.dtype)
        else:  # unlinked at once: a killed run leaves no scratch behind
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".ultrastyle-level-")
        self.filled = 0

    def __call__(self, rows: np.ndarray) -> None:
        if self._ram is not None:
            self._ram[self.filled : self.filled + rows.shape[0]] = rows
        else:
            assert self._file is not None
            data, offset = memoryview(np.ascontiguousarray(rows, self.dtype)).cast("B"), self.filled * self.row_bytes
            while data.nbytes:
                n = write_at(self._file.fileno(), data, offset)
                data, offset = data[n:], offset + n
        self.filled += rows.shape[0]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        if self._ram is not None:
            return self._ram[r0:r1]
        assert self._file is not None
        out = np.empty((r1 - r0, self.shape[1], 3), self.dtype)
        view, offset = memoryview(out).cast("B"), r0 * self.row_bytes
        while view.nbytes:
            n = read_at(self._file.fileno(), view, offset)
            if n <= 0:
                raise OSError(f"level scratch file: read {n} bytes at offset {offset}, expected {view.nbytes}")
            view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._ram = self._file = None


def _tiles(bands: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """`TIFF_TILE`-square tiles of `TIFF_TILE`-row bands, row by row (tifffile pads the edge ones)."""
    for band in bands:
        for c in range(0, width, TIFF_TILE):
            yield band[:, c : c + TIFF_TILE]


def write_tiff_pyramid(src: Pixels, path: str | Path, options: PyramidOptions = PyramidOptions(), *, dtype: type = np.uint8,
                       meta: OutputMeta | None = None) -> Path:  # fmt: skip
    """Write ``src`` as a tiled pyramidal TIFF at ``path`` (tifffile): the full level, then its halves in SubIFDs.

    ``src``: (H, W, 3) uint8/uint16 or a [0, 1] canvas (converted to
    ``dtype``), read `TIFF_TILE` rows at a time; reduced levels are made from
    those rows as they pass and kept (`_Spill`) until written. BigTIFF where
    the pixels could pass 4 GB. Written to a temp name, renamed when complete.
    Returns ``path``; raises `ImageError` naming it.
    """
    import tifffile

    path = Path(path)
    if isinstance(src, np.ndarray):
        dtype = src.dtype.type
    if options.tiff_compression == "jpeg" and np.dtype(dtype) != np.uint8:
        raise ImageError(f"{path}: JPEG compression holds 8-bit samples only; use deflate or zstd for 16-bit")
    h, w = image_size(src)
    sizes = tiff_levels(h, w)
    raw = sum(lh * lw * 3 for lh, lw in sizes) * np.dtype(dtype).itemsize
    compression = TIFF_COMPRESSIONS[options.tiff_compression]
    kwargs: dict = {"tile": (TIFF_TILE, TIFF_TILE), "photometric": "rgb", "compression": compression, "metadata": None,
                    "buffersize": _ENCODE_BYTES}  # fmt: skip
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": options.jpeg_quality}
    else:
        kwargs["predictor"] = True  # horizontal differencing: smaller files for photographs
    spills: list[_Spill] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        spills = [_Spill(lh, lw, dtype, path.parent) for lh, lw in sizes[1:]]
        chain: _Level | None = None
        for spill in reversed(spills):
            chain = _Level(spill, chain)
        full = _Level(lambda rows: None, chain)

        def full_bands() -> Iterator[np.ndarray]:
            for band in _bands(src, dtype, TIFF_TILE):
                full.push(band)  # the reduced levels are made as the full one streams past
                yield band

        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=raw > _BIGTIFF_AT) as tif:
            tif.write(_tiles(full_bands(), w), shape=(h, w, 3), dtype=dtype, subifds=len(spills), **kwargs,
                      **(meta.tiff_tags() if meta else {}))  # fmt: skip
            full.finish()  # here, not after the generator's loop: tifffile takes the tiles it needs, never StopIteration
            for spill in spills:
                lh, lw, _ = spill.shape
                if spill.filled != lh:  # a bug, not a bad file
                    raise RuntimeError(f"{path}: a reduced level got {spill.filled} of {lh} rows")
                bands = (spill.rows(r, min(lh, r + TIFF_TILE)) for r in range(0, lh, TIFF_TILE))
                tif.write(_tiles(bands, lw), shape=(lh, lw, 3), dtype=dtype, subfiletype=1, **kwargs)
                spill.close()  # its scratch space comes back before the next level
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the tiled TIFF ({exc.strerror or exc})") from exc
    finally:
        for spill in spills:
            spill.close()
    return path
