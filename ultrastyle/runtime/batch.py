"""Batch stylization: every content x style pair, streamed, surviving bad files.

The style side of a pair is a `StyleSpec` (`runtime.pairs`, with the pairs'
outputs and results): one style, a weighted mix of several (one output blending
their statistics), or one style per mask label.
Each style is read and its statistics computed once for the whole batch (per
content with ``preserve_color="match"``, which recolours the style to each
content).

`run_batch` streams: worker threads decode (`runtime.decode`) the next contents while the
runner computes the current one, and encode finished outputs behind it, so
the device does not wait on files and the CPU does not wait on the device.
Decoded images waiting to be computed and outputs waiting to be encoded
count against one allowance (`StylizeOptions.io_memory`), beside the
working-memory budget of the image being computed. A pair that fails
(unreadable content, style or mask, a mask of the wrong size, unwritable
output) is recorded with one message naming the file and the cause; the
other pairs still run, and results are reported in pair order.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrastyle.io.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_STYLE_SIZE, ImageError, as_role
from ultrastyle.io.sources import ImageInput, Source, resized_header
from ultrastyle.io.metadata import METADATA
from ultrastyle.io.pyramid import PyramidOptions, check_output_size, dzi_name, image_size, output_meta, save_output, streams
from ultrastyle.io.masks import check_label_count, labels_of, read_labels, resize_labels
from ultrastyle.io.atomic import disk_full
from ultrastyle.io.paths import file_signature
from ultrastyle import options as check
from ultrastyle.options import OptionError
from ultrastyle.runtime.backends.base import StageNetworks
from ultrastyle.core.canvas import Canvas, canvas_from_array
from ultrastyle.core.plan import ImagePlan, TilingOptions
from ultrastyle.core.traits import RunnerTraits
from ultrastyle.runtime.cascade import DEFAULT_ALPHA, DEFAULT_LEVELS
from ultrastyle.runtime.decode import Decoded, decode, read_plan, warn_read_whole
from ultrastyle.runtime.pairs import BatchInterrupted, BatchSummary, Pair, PairResult, StyleSpec, not_made_disk_full
from ultrastyle.core.color import MODES as COLOR_MODES, keep_content_chroma_canvas, match_colors, rgb_statistics
from ultrastyle.runtime.memory import release_free_memory
from ultrastyle.errors import warn
from ultrastyle.core.styles import Regions, Style, Target, unsampled_labels
from ultrastyle.runtime.tiled import (
    TileCallback, canvas_to_image, plan_image_for, style_statistics_tiled, stylize_tiled,
)  # fmt: skip
from ultrastyle.core.transforms import FeatureStats

STREAMING = ("auto", "always", "never")
# The share of a host max_memory held for decoded contents and outputs waiting to be encoded (the io
# allowance); the tiles and canvases of the image being computed get the rest.
IO_SHARE = 0.25
# Whole-image runs (``tiling=None``) are the one-tile case of the tiled pipeline, with no budget.
UNBOUNDED = TilingOptions.unbounded()


@dataclass(frozen=True)
class StylizeOptions:
    """Everything about one batch except the model; `None` entries of the public API are resolved before this."""

    method: str = "wct"
    alpha: float = DEFAULT_ALPHA
    levels: tuple[int, ...] = DEFAULT_LEVELS
    content_size: int = 0
    style_size: int = DEFAULT_STYLE_SIZE
    format: str = "png"
    skip_existing: bool = False
    shard: tuple[int, int] | None = None  # (K, N): the batch's K-th of N parts of its contents (`runtime.pairs.deal`); None: all
    max_pixels: int = DEFAULT_MAX_PIXELS
    depth: int = 8  # bits per sample of the output (16: png/tiff)
    tiling: TilingOptions | None = field(default_factory=TilingOptions)  # None: `TilingOptions.unbounded()`
    preserve_color: str = "none"  # "luminance": the content's chroma; "match": the style recoloured to the content
    png_level: int = DEFAULT_PNG_LEVEL  # zlib level of PNG outputs (0-9)
    io_workers: int = 0  # decoding and encoding threads each; 0: from the core count (`default_io_workers`)
    # Bytes of decoded contents and of outputs waiting to be encoded, beside the budget of the image being
    # computed; at least one of each is always admitted. None: `IO_SHARE` of the budget (1 GiB whole-image).
    io_memory: int | None = None
    pyramid: PyramidOptions = PyramidOptions()  # zoomable outputs: dzi, and tiff's layout and compression
    # Content files read a band at a time (`io.stream`): "auto" where reading one whole would not fit the
    # allowance of decoded images (`io_allowance`), "always" where the file allows it, "never".
    streaming: str = "auto"
    metadata: str = "keep"  # what outputs keep of their content file's metadata (`io.metadata.METADATA`)

    def __post_init__(self) -> None:  # `api.make_options` checks every value; this guards direct construction, by its rules
        object.__setattr__(self, "preserve_color", check.choice("preserve_color", self.preserve_color, COLOR_MODES))
        object.__setattr__(self, "streaming", check.choice("streaming", self.streaming, STREAMING))
        object.__setattr__(self, "metadata", check.choice("metadata", self.metadata, METADATA))
        if check.count("png_level", self.png_level) > 9:
            raise OptionError("png_level", f"expected a zlib level 0..9, got {self.png_level}; give 0 (fastest) to 9 (smallest)")

    @property
    def resolved_tiling(self) -> TilingOptions:
        """The tiling as given: ``max_memory`` is the whole run's budget (`tiling_for` splits it for the tiles)."""
        return self.tiling if self.tiling is not None else UNBOUNDED

    @property
    def io_allowance(self) -> int:
        """Bytes for decoded contents and outputs waiting to be encoded: ``io_memory``, else `IO_SHARE` of the budget."""
        if self.io_memory is not None:
            return self.io_memory
        budget = self.resolved_tiling.max_memory
        return int(budget * IO_SHARE) if budget is not None else 2**30

    def tiling_for(self, traits: RunnerTraits) -> TilingOptions:
        """The tiles' options on a runner with ``traits``.

        A host budget bounds the whole process above its baseline (`runtime.memory.measure_baseline`): the io
        allowance comes out of it and the tiles and canvases get the rest. A device budget (GPU memory) is the
        tiles' alone; the io allowance is host memory beside it.
        """
        t = self.resolved_tiling
        if t.max_memory is None or (t.budget or traits.budget_memory) != "host":
            return t
        return replace(t, max_memory=max(1, t.max_memory - self.io_allowance))

    def budget_for_tiles(self, tile_bytes: int, traits: RunnerTraits) -> int:
        """The least ``max_memory`` whose share for the tiles (`tiling_for`) is at least ``tile_bytes``."""
        t = self.resolved_tiling
        if (t.budget or traits.budget_memory) != "host":
            return tile_bytes
        if self.io_memory is not None:
            return tile_bytes + self.io_memory
        return math.ceil(tile_bytes / (1 - IO_SHARE))

    @property
    def workers(self) -> int:
        return self.io_workers or default_io_workers()


def default_io_workers() -> int:
    """Half the cores for decoding (and as many for encoding), 1 to 8: the rest compute."""
    return max(1, min(8, check.usable_cpus() // 2))


class UnusedStyleWarning(UserWarning):
    """A mask region smaller than one feature pixel of every stage run: its style is not applied."""


def _version(src: Source) -> tuple:
    """What a cached result of ``src`` depends on: a file's path and `file_signature` (None while missing), or an in-memory
    image's digest (not the image: a cache of statistics must not hold the pixels they came from)."""
    return ("memory", src.key) if isinstance(src, ImageInput) else (src, file_signature(src))


_CACHE_LOCK = threading.Lock()  # the books' dictionaries (a Stylizer's masks are shared by its books)
_MISSING = object()


def _nbytes(value: object) -> int:
    """The bytes of the arrays and tensors in a cached value (statistics, a label map; an error: none)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.nbytes
    if isinstance(value, FeatureStats):
        return value.sum.nbytes + value.outer.nbytes
    if isinstance(value, dict):
        return sum(map(_nbytes, value.values()))
    if isinstance(value, (tuple, list)):
        return sum(map(_nbytes, value))
    return 0


class StyleBook:
    """Style statistics per style image, computed on first use; a bad style fails all its pairs with one error.

    Results (errors too) are kept per file version (`_version`): a style file
    created, fixed or replaced since is read again, and its earlier versions are
    dropped. At most `KEEP` of them and `KEEP_BYTES` are kept (masks: `KEEP_MASKS`,
    `KEEP_MASK_BYTES`), the least recently used dropped first; the last one always stays.
    """

    KEEP = 256
    # A style's statistics: 0.31 MB measured for cd-wct-16x's five stages (float64 sums), ~4.7 MB for a full VGG-19
    # (512x512 at stages 4-5): 256 MB holds ~55 of the other's; the one's stop at `KEEP` (~80 MB). For every settings
    # of a Stylizer together.
    KEEP_BYTES = 256 << 20
    KEEP_MASKS = 4  # a mask's label map: a byte per pixel, 1 GB at a gigapixel
    KEEP_MASK_BYTES = 512 << 20

    def __init__(self, model: StageNetworks, options: StylizeOptions, masks: OrderedDict | None = None,
                 stats: OrderedDict | None = None, tag: tuple = ()) -> None:  # fmt: skip
        """``masks``, ``stats``: label maps and statistics shared with other books (a `Stylizer`'s, one per settings), so
        the limits bound them all. Masks depend on no setting but ``max_pixels``, which their key holds; statistics are
        kept under ``tag``, the settings they depend on."""
        self.model, self.options, self._tag = model, options, tag
        self._stats: OrderedDict[tuple, dict[int, FeatureStats] | ImageError] = OrderedDict() if stats is None else stats
        self._masks: OrderedDict[tuple, tuple[np.ndarray, list] | ImageError] = OrderedDict() if masks is None else masks
        self._warned: OrderedDict[tuple, None] = OrderedDict()  # masks warned of (`_warn_unsampled`), the last `KEEP`

    def _remember(self, book: OrderedDict, key: tuple, make: Callable[[], Any], keep: int | None = None, keep_bytes: int | None = None) -> Any:
        with _CACHE_LOCK:  # dictionary work only: threads compute apart (two may compute one style once each)
            got = book.get(key, _MISSING)
            if got is not _MISSING:
                book.move_to_end(key)
        if got is _MISSING:
            try:
                got = make()
            except ImageError as exc:  # kept bare: its traceback's frames would keep the image (an in-memory one's pixels)
                got = exc.with_traceback(None)
                exc.__context__ = exc.__cause__ = None
            with _CACHE_LOCK:
                if key[0] != "memory":  # a file's earlier versions are never asked for again: they go now, not at the cap
                    for old in [k for k in book if k[0] == key[0] and k[1] != key[1]]:  # (path, signature, ...)
                        del book[old]
                book[key] = got
                keep, keep_bytes = keep or self.KEEP, keep_bytes or self.KEEP_BYTES
                held = sum(map(_nbytes, book.values()))
                while len(book) > 1 and (len(book) > keep or held > keep_bytes):
                    held -= _nbytes(book.popitem(last=False)[1])
        if isinstance(got, ImageError):
            raise copy.copy(got)  # a copy takes this raise's traceback: the kept one holds no frame (and none of their images)
        return got

    def forget_errors(self) -> None:
        """Drop the errors kept (not the statistics): a new call reads a failed style or mask again, which a fix that
        leaves the file's signature as it was (a chmod, a folder's permissions, a network share back) made readable."""
        with _CACHE_LOCK:
            for book in (self._stats, self._masks):
                for key in [k for k, v in book.items() if isinstance(v, ImageError)]:
                    del book[key]

    def get(self, src: Source, recolor: FeatureStats | None = None) -> dict[int, FeatureStats]:
        """Statistics of style ``src``; with ``recolor`` (a content's RGB statistics) of the recoloured style, not cached."""
        if recolor is not None:
            return self._compute(src, recolor)
        return self._remember(self._stats, (*_version(src), *self._tag), lambda: self._compute(src, None))

    def _compute(self, src: Source, recolor: FeatureStats | None) -> dict[int, FeatureStats]:
        # Read as a content is, at style_size: streamed (and resized band by band) where reading it whole would not fit the
        # allowance for decoded images, and its canvas where a content's of its size would go (`plan_image`: on disk where
        # RAM would break the budget), so a 48 MP style keeps the memory rule too (measured: 1.83 GB peak at 1GB in RAM).
        opts = replace(self.options, content_size=self.options.style_size)
        try:
            plan = read_plan(src, opts, "style_size")
            warn_read_whole(src, opts, plan)
            decoded = decode(src, opts, plan)
        except ImageError as exc:
            raise as_role("style", exc) from None
        h, w = decoded.shape[:2]
        placed = plan_image_for(self.model, h, w, opts.levels, opts.tiling_for(self.model.traits))
        canvas = decoded.to_canvas(placed.site)
        del decoded
        if recolor is not None:
            with canvas:
                recoloured = match_colors(torch.from_numpy(canvas.read(slice(None), slice(None))), recolor)
            canvas = canvas_from_array(recoloured.numpy(), layout="chw", disk_dir=placed.site.disk_dir, device=placed.site.device)
        with canvas:  # a large style is tiled like a content
            return style_statistics_tiled(self.model, canvas, opts.levels, placed.options)

    def style_for(self, spec: StyleSpec, size: tuple[int, int], original: tuple[int, int],
                  recolor: FeatureStats | None = None) -> Style:  # fmt: skip
        """The `Target` or `Regions` of ``spec`` for a content of ``size`` (``original``: its size before resizing)."""
        stats = tuple(self.get(p, recolor) for p in spec.paths)
        if spec.mask is None:
            return Target(stats, spec.weights or (1.0,))
        labels, colours = self._labels(spec.mask, len(spec.paths))
        if labels.shape != original:
            raise ImageError(
                f"{spec.mask}: the mask is {labels.shape[1]}x{labels.shape[0]} but the content is "
                f"{original[1]}x{original[0]}; give a mask of the content's size"
            )
        regions = Regions(resize_labels(labels, *size), tuple(Target((s,)) for s in stats))
        self._warn_unsampled(spec.mask, regions.labels, colours, labels)
        return regions

    def _warn_unsampled(self, mask: Source, labels: np.ndarray, colours: list, original: np.ndarray) -> None:
        """One `UnusedStyleWarning` per mask version, content size and stages where a region of the mask (``original``) is
        sampled by no feature pixel of the stages run in ``labels`` (it at the content's size): its style would not be applied."""
        key = (*_version(mask), labels.shape, tuple(self.options.levels))
        with _CACHE_LOCK:
            if key in self._warned:
                return
            self._warned[key] = None
            while len(self._warned) > self.KEEP:
                self._warned.popitem(last=False)
        present = np.flatnonzero(np.bincount(original.ravel(), minlength=1))
        if lost := unsampled_labels(labels, [self.model.arch.grid(k) for k in self.options.levels], present):
            stages = ", ".join(map(str, self.options.levels))
            shown = ", ".join(str(c[0] if len(c) == 1 else c) for c in (colours[i] for i in lost))
            warn(f"{mask}: the region(s) of colour {shown} are smaller than one feature pixel of stage(s) {stages} at "
                          f"{labels.shape[1]}x{labels.shape[0]}, so their style is not applied; paint them larger, or run finer stages "
                          "(levels)", UnusedStyleWarning)  # fmt: skip

    def labels(self, src: Source, styles: int) -> np.ndarray:
        """The mask's label map, read once per file version; its label count must equal the number of styles."""
        return self._labels(src, styles)[0]

    def _labels(self, src: Source, styles: int) -> tuple[np.ndarray, list]:
        """`labels` and the colour of each label."""

        def read() -> tuple[np.ndarray, list]:
            if isinstance(src, ImageInput):
                return labels_of(src.pixels, str(src))
            return read_labels(src, max_pixels=self.options.max_pixels)

        labels, colours = self._remember(self._masks, (*_version(src), self.options.max_pixels), read, self.KEEP_MASKS, self.KEEP_MASK_BYTES)
        check_label_count(src, colours, styles)  # per call: the same mask may come with another number of styles
        return labels, colours


def stylize_canvas(
    model: StageNetworks,
    content: Canvas,
    style: Style,
    options: StylizeOptions,
    on_tile: TileCallback | None = None,
    plan: ImagePlan | None = None,
    *,
    as_canvas: bool = False,
    last_use: bool = False,
) -> np.ndarray | Canvas:
    """The cascade of ``options`` on a content canvas: (H, W, 3) uint8 (``depth`` 8) or uint16, clamped and rounded.

    ``plan``: the image's plan (`runtime.tiled.plan_image_for`), else made from ``options``. ``as_canvas``:
    return the last stage's (3, H, W) canvas instead, for a writer that reads it band by band and closes it
    (it may be ``content`` itself). ``last_use``: the caller needs ``content`` no more, so its canvas may be
    reused by later stages (`stylize_tiled`'s ``consume_content``)."""
    consume = last_use and options.preserve_color != "luminance"  # luminance reads the content after the cascade
    result = stylize_tiled(
        model, content, style, options.tiling_for(model.traits),
        method=options.method, alpha=options.alpha, levels=options.levels, on_tile=on_tile, plan=plan,
        consume_content=consume,
    )  # fmt: skip
    try:
        if options.preserve_color == "luminance":
            keep_content_chroma_canvas(result, content)
        if as_canvas:
            handed, result = result, None
            return handed
        return canvas_to_image(result, np.uint8 if options.depth == 8 else np.uint16)
    finally:
        if result is not None:
            result.close()


def _failure(pair: Pair, exc: Exception, seconds: float = 0.0) -> PairResult:
    if isinstance(exc, ImageError):
        msg = str(exc)
    elif isinstance(exc, ValueError):  # e.g. a memory budget too small for this image's tiles
        msg = f"{pair.content}: {exc}"
    else:  # out of memory, a backend or disk error: this pair fails, the batch goes on
        msg = f"{pair.content}: stylization failed ({type(exc).__name__}: {exc})"
    return PairResult(pair, "failed", msg, seconds, remedy=getattr(exc, "remedy", None), option=exc.option if isinstance(exc, OptionError) else None)


class _CallbackRaised(Exception):
    """What a caller's ``on_tile`` raised, on its way through the pair's own error handling."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _raising_through(on_tile: TileCallback | None) -> TileCallback | None:
    """``on_tile`` whose exceptions reach the caller as raised, not as the pair's failure (KeyboardInterrupt does anyway)."""
    if on_tile is None:
        return None

    def call(what: str, done: int, total: int) -> None:
        try:
            on_tile(what, done, total)
        except Exception as exc:
            raise _CallbackRaised(exc) from exc

    return call


def stylize_content(
    model: StageNetworks,
    decoded: Decoded,
    pairs: Sequence[Pair],
    styles: StyleBook,
    options: StylizeOptions,
    on_tile: TileCallback | None = None,
    on_output: Callable[[Pair, np.ndarray | Canvas, float], None] | None = None,
    *,
    raise_errors: bool = False,
    skip: Callable[[Pair], PairResult | None] | None = None,
) -> list[PairResult | None]:
    """Every pair of one ``decoded`` content; a pair's output goes to ``on_output`` (its result then None),
    else into its result. Failures are results (raised with ``raise_errors``); the content canvas is built once
    for all its pairs. ``skip(pair)``: a result instead of the work (the batch has stopped), or None. An output file of a zoomable format (`io.pyramid.streams`) goes to ``on_output`` as
    the last stage's host canvas, which the receiver writes band by band and closes."""
    h, w = decoded.shape[:2]
    original = decoded.original
    t0 = time.perf_counter()
    results: list[PairResult | None] = []
    tiling = options.tiling_for(model.traits)
    on_tile = _raising_through(on_tile)
    try:  # one plan per image: where its canvases go, each stage's tiles
        for pair in pairs:  # an output its format cannot hold fails now, not after the tiles
            if pair.output is not None:
                check_output_size(pair.output, options.format, h, w)
        plan = plan_image_for(model, h, w, options.levels, tiling, masked=any(p.style.mask is not None for p in pairs))
        content = decoded.to_canvas(plan.site)
    except Exception as exc:  # noqa: BLE001 - the pairs fail, the batch goes on
        if raise_errors:
            raise
        return [_failure(p, exc, time.perf_counter() - t0) for p in pairs]
    handed_content = False
    try:  # the decoded pixels are gone: the canvas holds them (on disk when large, on the GPU where it fits)
        recolor = rgb_statistics(content) if options.preserve_color == "match" else None
        # A GPU canvas would hold device memory the next image is planned to use: converted here as before.
        stream = on_output is not None and plan.site.device is None and streams(options.format, h, w, options.pyramid)
        for pair in pairs:
            t0 = time.perf_counter()
            if skip is not None and (skipped := skip(pair)) is not None:
                results.append(skipped)
                continue
            try:
                style = styles.style_for(pair.style, (h, w), original, recolor)
                out = stylize_canvas(model, content, style, options, on_tile, plan, as_canvas=stream and pair.output is not None,
                                     last_use=len(pairs) == 1)  # fmt: skip
            except _CallbackRaised as exc:  # the caller's own error (a cancel), not this pair's: it ends the batch as raised
                raise exc.error from None
            except Exception as exc:  # noqa: BLE001
                if raise_errors:
                    raise
                results.append(_failure(pair, exc, time.perf_counter() - t0))
                continue
            seconds = time.perf_counter() - t0
            if on_output is not None:
                handed_content = out is content  # the cascade ended in the content's canvas: the receiver closes it
                on_output(pair, out, seconds)
                results.append(None)
            else:
                results.append(PairResult(pair, "done", None, seconds, h * w / 1e6, out))
    finally:
        if not handed_content:
            content.close()
    return results


def output_megapixels(src: Source, options: StylizeOptions) -> float:
    """The megapixels ``src`` will have after ``content_size`` (from its header; 0 when unreadable)."""
    hw = resized_header(src, options.content_size)
    return 0.0 if hw is None else hw[0] * hw[1] / 1e6


class _Allowance:
    """Bytes held by queued images: decoded contents not yet in a canvas, outputs not yet encoded.

    Reads ahead are only started where they fit (one is always let in); an
    output waits for room only while earlier outputs are being encoded (they
    give theirs back on their own), so nothing waits on itself.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def fits(self, n: int) -> bool:
        with self._cond:
            return self.used == 0 or self.used + n <= self.limit

    def take(self, n: int, wait_while: Callable[[], bool] | None = None) -> None:
        """Count ``n`` bytes; first, while ``wait_while()`` holds, wait for them to fit."""
        with self._cond:
            while wait_while is not None and self.used and self.used + n > self.limit and wait_while():
                self._cond.wait(0.1)
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


# How a whole file of a format ends: a PNG with its IEND chunk, a JPEG with its end-of-image marker.
_ENDINGS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


def output_exists(path: Path) -> bool:
    """Whether an output is there whole (what ``skip_existing`` keeps): a Deep Zoom ``NAME.dzi`` counts only beside its
    ``NAME_files/`` tiles; an empty file, or a PNG or JPEG cut short (a copy or sync interrupted: this tool writes
    through a rename), not at all."""
    suffix = path.suffix.lower()
    if suffix == ".dzi":
        return path.is_file() and path.with_name(f"{dzi_name(path)}_files").is_dir()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if suffix not in _ENDINGS or size == 0:
                return size > 0
            end = _ENDINGS[suffix]
            f.seek(max(0, size - len(end)))
            return f.read() == end
    except OSError:
        return False


def content_runs(pairs: Sequence[Pair], skip_existing: bool) -> tuple[list[PairResult | None], list[tuple[Source, list[int]]]]:
    """The results known before any work (pairs skipped for an existing output) and the runs of consecutive
    pairs that share a content, as (content, pair indices): each run reads its content once."""
    results: list[PairResult | None] = [None] * len(pairs)
    runs: list[tuple[Source, list[int]]] = []
    for i, pair in enumerate(pairs):
        if skip_existing and pair.output is not None and output_exists(pair.output):
            results[i] = PairResult(pair, "skipped")
        elif runs and runs[-1][0] == pair.content and runs[-1][1][-1] == i - 1:
            runs[-1][1].append(i)
        else:
            runs.append((pair.content, [i]))
    return results, runs


class InOrder:
    """Hands ``results`` on in pair order: each call passes the finished prefix to ``summary`` and ``on_result``."""

    def __init__(self, results: list[PairResult | None], summary: BatchSummary, on_result: Callable[[PairResult], None] | None) -> None:
        self.results, self.summary, self.on_result = results, summary, on_result
        self.reported = 0

    def __call__(self) -> None:
        while self.reported < len(self.results) and (r := self.results[self.reported]) is not None:
            self.summary.results.append(r)
            self.reported += 1  # before the callback: a Ctrl-C inside it must not count this result twice
            if self.on_result:
                self.on_result(r)


@dataclass
class _Job:
    """One content and its consecutive pairs (content-major order: read once)."""

    content: Source
    indices: list[int]
    estimate: int = 0
    read: Future | None = None
    plan: tuple[bool, int, str | None] | None = None  # `read_plan`
    refused: ImageError | None = None  # `read_plan`'s refusal: the content's pairs fail without a read


class _BatchRun:
    """The state of one `run_batch`: reads ahead within the allowance, stylizes job by job, writes on threads."""

    def __init__(self, model: StageNetworks, pairs: list[Pair], options: StylizeOptions,
                 on_result: Callable[[PairResult], None] | None, on_tile: TileCallback | None, styles: StyleBook | None) -> None:
        self.model, self.pairs, self.options, self.on_tile = model, pairs, options, on_tile
        self.results, runs = content_runs(pairs, options.skip_existing)
        self.summary = BatchSummary(planned=len(pairs))
        self.report = InOrder(self.results, self.summary, on_result)
        self.jobs = [_Job(content, indices) for content, indices in runs]
        self.report()
        for job in self.jobs:  # before any work: which contents stream, and one line for each that should but cannot
            try:
                job.plan = read_plan(job.content, options)
            except ImageError as exc:
                job.plan, job.refused = (False, 0, None), exc
                continue
            warn_read_whole(job.content, options, job.plan)
        self.styles = styles if styles is not None else StyleBook(model, options)
        self.workers = options.workers
        self.allowance = _Allowance(options.io_allowance)
        self.writes: deque[Future] = deque()
        self.full: tuple[Path, OSError] | None = None  # the output whose write found the disk full (`not_made_disk_full`)
        self.readers = ThreadPoolExecutor(self.workers, thread_name_prefix="ultrastyle-read")
        self.writers = ThreadPoolExecutor(self.workers, thread_name_prefix="ultrastyle-write")
        self.submitted = 0

    def read_ahead(self, current: int) -> None:
        """Start reading the jobs after ``current`` that fit the allowance (``current`` itself always)."""
        while self.submitted < len(self.jobs) and self.submitted <= current + self.workers:
            job = self.jobs[self.submitted]
            assert job.plan is not None
            job.estimate = job.plan[1]
            if self.submitted > current and not self.allowance.fits(job.estimate):
                return
            self.allowance.take(job.estimate)
            if job.refused is not None:
                job.read = Future()
                job.read.set_exception(job.refused)
            else:
                job.read = self.readers.submit(decode, job.content, self.options, job.plan)
            self.submitted += 1

    def write(self, i: int, pair: Pair, out: np.ndarray | Canvas, seconds: float, nbytes: int) -> None:
        """Encode one output (on a writer thread); a failure fails its pair only."""
        options = self.options
        try:
            assert pair.output is not None
            if (stopped := self.stopped(pair)) is not None:  # an earlier output found the disk full: this one is not tried
                self.results[i] = stopped
                return
            save_output(out, pair.output, options.format, depth=options.depth, png_level=options.png_level, pyramid=options.pyramid,
                        meta=output_meta(pair.content, out, options.metadata))  # fmt: skip
            h, w = image_size(out)
            self.results[i] = PairResult(pair, "done", None, seconds, h * w / 1e6)
        except Exception as exc:  # noqa: BLE001 - the pair fails, the batch goes on
            self.results[i] = _failure(pair, exc, seconds)
            if self.full is None and (full := disk_full(exc)) is not None:  # the batch stops computing (`run_batch`)
                self.full = (pair.output, full)
        finally:
            if isinstance(out, Canvas):
                out.close()
            self.allowance.give(nbytes)

    def queue_write(self, i: int, pair: Pair, out: np.ndarray | Canvas, seconds: float) -> None:
        """Hand one output on: kept in memory without an output path, else queued for a writer."""
        if pair.output is None:
            assert isinstance(out, np.ndarray)
            self.results[i] = PairResult(pair, "done", None, seconds, out.shape[0] * out.shape[1] / 1e6, out)
            return
        nbytes = 2 * out.nbytes  # encoded whole: the pixels and the encoder's output
        if isinstance(out, Canvas):
            nbytes = out.nbytes
            if out.on_disk:  # read a band at a time: its file is not RAM
                nbytes = min(nbytes, out.shape[0] * out.shape[2] * 4 * 512)
        self.allowance.take(nbytes, wait_while=lambda: any(not f.done() for f in self.writes))
        self.writes.append(self.writers.submit(self.write, i, pair, out, seconds, nbytes))

    def run_job(self, j: int) -> None:
        """Read (ahead), stylize and queue the outputs of job ``j``; its pairs fail together if its content cannot be read."""
        job, pairs = self.jobs[j], self.pairs
        self.read_ahead(j)
        assert job.read is not None
        try:
            decoded = job.read.result()
        except Exception as exc:  # noqa: BLE001 - ImageError mostly; the content's pairs fail
            for i in job.indices:
                self.results[i] = _failure(pairs[i], exc)
            self.allowance.give(job.estimate)
            return
        finally:
            job.read = None  # the future holds the pixels too
        given = False

        def give_back() -> None:
            nonlocal given
            given = True
            self.allowance.give(job.estimate)

        decoded.on_take = give_back  # once the canvas holds the pixels
        by_pair = {id(pairs[i]): i for i in job.indices}
        try:
            got = stylize_content(self.model, decoded, [pairs[i] for i in job.indices], self.styles, self.options, self.on_tile,
                                  lambda pair, out, seconds: self.queue_write(by_pair[id(pair)], pair, out, seconds),
                                  skip=self.stopped)  # fmt: skip
        finally:
            del decoded
            if not given:
                self.allowance.give(job.estimate)
        for i, r in zip(job.indices, got):
            if r is not None:
                self.results[i] = r
        release_free_memory()  # the next image may be smaller: do not hold this one's peak
        while self.writes and self.writes[0].done():
            self.writes.popleft().result()

    def stopped(self, pair: Pair) -> PairResult | None:
        """``pair``'s result when the batch has stopped (a write found the output disk full), else None: it runs."""
        return None if self.full is None else not_made_disk_full(pair, *self.full)

    def stop_for_full_disk(self, j: int) -> None:
        """Jobs ``j`` on are not computed (nor their contents read): each of their outputs would fail after its work."""
        for job in self.jobs[j:]:
            for i in job.indices:
                if self.results[i] is None:
                    self.results[i] = self.stopped(self.pairs[i])

    def interrupted(self) -> BatchSummary:
        """After Ctrl-C: outputs not yet being encoded are dropped, those being encoded are finished."""
        self.readers.shutdown(wait=False, cancel_futures=True)
        for f in self.writes:
            f.cancel()
        for f in self.writes:
            if not f.cancelled():
                f.result()
        self.report()
        self.summary.results += [r for r in self.results[self.report.reported:] if r is not None]  # finished after a gap: still done
        return self.summary

    def close(self) -> None:
        self.readers.shutdown(wait=True, cancel_futures=True)
        self.writers.shutdown(wait=True)


def run_batch(
    model: StageNetworks,
    pairs: list[Pair],
    options: StylizeOptions,
    on_result: Callable[[PairResult], None] | None = None,
    on_tile: TileCallback | None = None,
    styles: StyleBook | None = None,
) -> BatchSummary:
    """Stylize ``pairs``, streaming; results reach ``on_result`` and the summary in pair order.

    Outputs are written atomically (an interrupted batch resumes with
    ``skip_existing``); Ctrl-C raises `BatchInterrupted` with the summary so far.
    ``styles``: a book of style statistics made for ``options`` to use and fill (a `Stylizer`'s, kept across its
    calls); default a fresh one.
    """
    from ultrastyle.io import atomic

    for folder in {p.output.parent for p in pairs if p.output is not None}:
        atomic.sweep_stale(folder)  # temp files of a killed earlier run
    t_start = time.perf_counter()
    run = _BatchRun(model, pairs, options, on_result, on_tile, styles)
    try:
        for j in range(len(run.jobs)):
            if run.full is not None:
                run.stop_for_full_disk(j)
                break
            run.run_job(j)
            run.report()
        for f in run.writes:
            f.result()
        run.report()
    except KeyboardInterrupt:
        summary = run.interrupted()
        summary.wall_seconds = time.perf_counter() - t_start
        raise BatchInterrupted(summary) from None
    finally:
        run.close()
    run.summary.wall_seconds = time.perf_counter() - t_start
    return run.summary


__all__ = [
    "InOrder", "StyleBook", "StylizeOptions", "UnusedStyleWarning", "content_runs", "default_io_workers", "output_megapixels", "run_batch",
    "stylize_canvas", "stylize_content",
]  # fmt: skip
