"""A content's pixels, read whole or a band of rows at a time: which one a file gets (`read_plan`), and the read (`decode`).

A read whole holds the decoded image (and its resized float copies); a streamed read (libvips, `io.stream`) holds a band.
`read_plan` picks from the file's header and the run's settings (any object with the fields of `ReadOptions`, such as
`runtime.batch.StylizeOptions`); the `Decoded` it gives hands its pixels over once, into the canvas the pipeline tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array, sample_peak
from ultrastyle.core.resample import resized_size
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.io.images import ImageError, array_to_tensor, pixel_count, resize_long_side
from ultrastyle.io.sources import ImageInput, Source, image_header, read_source
from ultrastyle.io.stream import ArrayStream, ImageStream, band_rows, open_array_stream, open_stream, stream_blocker
from ultrastyle.runtime.memory import release_free_memory


class ReadOptions(Protocol):
    """The settings a read depends on (`runtime.batch.StylizeOptions` has them)."""

    max_pixels: int
    content_size: int
    streaming: str  # "auto" | "always" | "never"

    @property
    def io_allowance(self) -> int: ...


def load_content(src: Source, options: ReadOptions) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) pixels, resized to ``content_size`` when asked, and the (H, W) of the file."""
    pixels = read_source(src, options.max_pixels)
    original = (pixels.shape[0], pixels.shape[1])
    if options.content_size and max(original) != options.content_size:
        return resize_long_side(array_to_tensor(pixels), options.content_size).permute(1, 2, 0).numpy(), original
    return pixels, original


class Decoded:
    """A decoded content, handed over once (`to_canvas`), so that only its canvas outlives the hand-over."""

    def __init__(self, pixels: np.ndarray, original: tuple[int, int]) -> None:
        self._pixels: np.ndarray | None = pixels
        self.original = original
        self.shape = pixels.shape
        self.on_take: Callable[[], None] | None = None  # e.g. give the queue allowance back

    def take(self) -> np.ndarray:
        pixels, self._pixels = self._pixels, None
        if pixels is None:
            raise RuntimeError("the decoded pixels were handed over already")
        self._taken()
        return pixels

    def _taken(self) -> None:
        if self.on_take is not None:
            self.on_take()
            self.on_take = None

    def to_canvas(self, site: CanvasSite) -> Canvas:
        """The pixels as a [0, 1] canvas at ``site`` (converted band by band; the pixels are dropped)."""
        return canvas_from_array(self.take(), disk_dir=site.disk_dir, device=site.device)


class StreamedDecoded(Decoded):
    """A content file that is decoded (and resized) into its canvas a band of rows at a time, never whole."""

    def __init__(self, stream: ImageStream | ArrayStream) -> None:
        self.stream = stream
        self.original = stream.original
        self.shape = (*stream.size, 3)
        self.on_take = None

    def take(self) -> np.ndarray:
        raise RuntimeError(f"{self.stream.path}: a streamed content is read into its canvas (to_canvas), not whole")

    def to_canvas(self, site: CanvasSite) -> Canvas:
        self._taken()
        h, w, c = self.shape
        canvas = Canvas(c, h, w, disk_dir=site.disk_dir, device=site.device)
        try:
            for r0, band in self.stream.bands():
                block = np.moveaxis(band, 2, 0).astype(np.float32)
                block /= np.float32(sample_peak(band.dtype))  # in place: one float copy of the band, not two
                canvas.write(r0, 0, block)
        except BaseException:
            canvas.close()
            raise
        release_free_memory()  # the bands' memory goes back before the tiles need it
        return canvas


def _whole_read_bytes(header: tuple[int, int, int], content_size: int) -> int:
    """The memory `load_content` takes for an image with ``header``: the decoded pixels, and resizing's float copies."""
    w, h, depth = header
    nh, nw = resized_size(h, w, content_size)
    resize = 12 * (h * w + 2 * nh * nw) if (nh, nw) != (h, w) else 0
    return h * w * 3 * depth + resize


def _streamed_read_bytes(header: tuple[int, int, int], content_size: int) -> int:
    """The memory a streamed read holds: a band of the file and of the resized rows (float32)."""
    w, h, _ = header
    nw = resized_size(h, w, content_size)[1]
    return band_rows(w) * 3 * 4 * (2 * w + nw) * 2


def read_plan(src: Source, options: ReadOptions, size_option: str = "content_size") -> tuple[bool, int, str | None]:
    """(stream?, bytes the read holds, why a file that should stream cannot) for ``src`` under ``options``.

    From one read of the header; an unreadable header counts 0 bytes (the read reports the file). An image that
    ``content_size`` (the setting ``size_option``) would enlarge past ``max_pixels`` is an `ImageError`, before any read.
    """
    header = image_header(src)
    if header is not None and options.content_size and header[0] * header[1] <= options.max_pixels:  # (above: the read says so)
        h, w = resized_size(header[1], header[0], options.content_size)
        if h * w > options.max_pixels:
            raise remedied(ImageError(
                f"{src}: resized to {w}x{h} ({size_option}) it would have "
                f"{pixel_count(h * w)}, above the limit of {pixel_count(options.max_pixels)} (max_pixels); give a smaller size"
            ), (Setting(size_option), Setting("max_pixels")))
    whole = 0 if header is None else _whole_read_bytes(header, options.content_size)
    if options.streaming == "never":
        return False, whole, None
    if isinstance(src, ImageInput):  # in memory already: only a resize has anything to stream (`ArrayStream`)
        h, w = src.pixels.shape[:2]
        resized = resized_size(h, w, options.content_size) != (h, w)
        banded = _streamed_read_bytes((w, h, 0), options.content_size)
        stream = resized and (options.streaming == "always" or options.io_allowance < whole > banded)
        return stream, banded if stream else whole, None
    if options.streaming == "auto" and whole <= options.io_allowance:
        return False, whole, None
    why = stream_blocker(src)
    if why is not None:
        return False, whole, why
    return True, 0 if header is None else _streamed_read_bytes(header, options.content_size), None


def decode(src: Source, options: ReadOptions, plan: tuple[bool, int, str | None] | None = None) -> Decoded:
    """``src`` read whole (`load_content`), or opened for a streamed read where `read_plan` says so.

    Without ``plan`` (the caller's `read_plan`, which warned already), a file that cannot stream warns here."""
    if plan is None:
        plan = read_plan(src, options)
        warn_read_whole(src, options, plan)
    if plan[0] and isinstance(src, ImageInput):
        return StreamedDecoded(open_array_stream(src, max_pixels=options.max_pixels, content_size=options.content_size))
    if plan[0]:
        return StreamedDecoded(open_stream(src, max_pixels=options.max_pixels, content_size=options.content_size))
    return Decoded(*load_content(src, options))


def warn_read_whole(src: Source, options: ReadOptions, plan: tuple[bool, int, str | None]) -> None:
    """One `ReadWholeWarning` where ``plan`` reads whole a file that should have streamed."""
    if plan[2] is not None:
        size = f"{plan[1] / 2**20:.0f} MiB"
        why = (f"{size}, above the {options.io_allowance / 2**20:.0f} MiB allowance for decoded images" if plan[1] > options.io_allowance
               else f"{size}; streaming was asked for")  # streaming="always"
        warn(f"{src}: read whole ({why}): {plan[2]}", ReadWholeWarning)


class ReadWholeWarning(UserWarning):
    """A content that should have been streamed (too large to read whole within the budget) is read whole."""


__all__ = ["Decoded", "ReadOptions", "ReadWholeWarning", "StreamedDecoded", "decode", "load_content", "read_plan", "warn_read_whole"]
