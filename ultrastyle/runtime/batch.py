"""Batch stylization: every content x style pair, surviving bad files.

The style side of a pair is a `StyleSpec`: one style file, a weighted mix of
several (one output blending their statistics), or one style per mask label.
Each style is read and its statistics computed once for the whole batch
(per pair with ``preserve_color="match"``, which recolours the style to each
content). A pair that fails (unreadable content, style or mask, a mask of the
wrong size, unwritable output) is recorded with one message naming the file
and the cause; the other pairs still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ultrastyle.io.images import (
    DEFAULT_MAX_PIXELS, ImageError, array_to_tensor, read_image, resize_long_side, save_array, save_image,
)  # fmt: skip
from ultrastyle.io.masks import check_label_count, read_labels, resize_labels
from ultrastyle.runtime.backends.base import StageNetworks
from ultrastyle.runtime.canvas import Canvas, canvas_from_array
from ultrastyle.runtime.cascade import DEFAULT_ALPHA, DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.color import check_mode, keep_content_chroma, keep_content_chroma_canvas, match_colors, rgb_statistics
from ultrastyle.runtime.memory import release_free_memory
from ultrastyle.runtime.styles import Regions, Style, Target, mix_weights
from ultrastyle.runtime.tiled import (
    TileCallback, TilingOptions, canvas_to_image, content_canvas, style_statistics_tiled, stylize_tiled,
)  # fmt: skip
from ultrastyle.runtime.transforms import FeatureStats


@dataclass(frozen=True)
class StylizeOptions:
    method: str = "wct"
    alpha: float = DEFAULT_ALPHA
    levels: tuple[int, ...] = DEFAULT_LEVELS
    content_size: int = 0
    style_size: int = 1024
    format: str = "png"
    skip_existing: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    depth: int = 8  # bits per sample of the output (16: png/tiff)
    tiling: TilingOptions | None = field(default_factory=TilingOptions)  # None: whole-image reference path
    preserve_color: str = "none"  # "luminance": the content's chroma; "match": the style recoloured to the content

    def __post_init__(self) -> None:
        check_mode(self.preserve_color)


@dataclass(frozen=True)
class StyleSpec:
    """The style side of one output: one file, a weighted mix, or one file per mask label.

    ``weights`` (a mix) are normalised to sum to 1. With ``mask``, label ``i``
    (the ``i``-th smallest colour of the mask, `io.masks.read_labels`) takes
    ``paths[i]``.
    """

    paths: tuple[Path, ...]
    weights: tuple[float, ...] | None = None
    mask: Path | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("a style needs at least one image")
        if self.weights is not None:
            if self.mask is not None:
                raise ValueError("a style mix and a mask cannot be combined; give one style per mask label")
            if len(self.weights) != len(self.paths):
                raise ValueError(f"{len(self.paths)} styles but {len(self.weights)} weights: give one weight per style")
            object.__setattr__(self, "weights", mix_weights(self.weights))
        elif len(self.paths) > 1 and self.mask is None:
            raise ValueError("several styles make one output only as a weighted mix or with a mask")

    @property
    def name(self) -> str:
        """The part of output file names that names the style."""
        if self.weights is not None:
            return "+".join(f"{p.stem}@{w:.3g}" for p, w in zip(self.paths, self.weights))
        return "+".join(p.stem for p in self.paths)

    def __str__(self) -> str:
        if self.weights is not None:
            return " + ".join(f"{p} x {w:.3g}" for p, w in zip(self.paths, self.weights))
        return " + ".join(map(str, self.paths)) + (f" (mask {self.mask})" if self.mask else "")


@dataclass(frozen=True)
class Pair:
    content: Path
    style: StyleSpec
    output: Path


@dataclass
class PairResult:
    pair: Pair
    status: str  # "done" | "skipped" | "failed"
    error: str | None = None
    seconds: float = 0.0
    megapixels: float = 0.0


@dataclass
class BatchSummary:
    results: list[PairResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def seconds_per_megapixel(self) -> float | None:
        done = [r for r in self.results if r.status == "done"]
        mp = sum(r.megapixels for r in done)
        return sum(r.seconds for r in done) / mp if mp else None


def output_name(content: Path, style: Path | StyleSpec, fmt: str) -> str:
    name = style.name if isinstance(style, StyleSpec) else style.stem
    return f"{content.stem}_stylized_{name}.{fmt}"


class OutputCollisionError(ValueError):
    """Two pairs would write the same output file."""


def plan_pairs(contents: list[Path], styles: list[Path] | list[StyleSpec], outdir: Path, fmt: str) -> list[Pair]:
    """Every content x style pair, in content-major order; refuses pairs that share an output name."""
    specs = [s if isinstance(s, StyleSpec) else StyleSpec((s,)) for s in styles]
    pairs = [Pair(c, s, outdir / output_name(c, s, fmt)) for c in contents for s in specs]
    seen: dict[Path, Pair] = {}
    for p in pairs:
        if p.output in seen:
            q = seen[p.output]
            raise OutputCollisionError(
                f"{q.content} + {q.style} and {p.content} + {p.style} would both write {p.output}; "
                "rename one of the files or stylize them into different --output folders"
            )
        seen[p.output] = p
    return pairs


class _StyleCache:
    """Style statistics per style file, computed on first use; a bad style fails all its pairs once."""

    def __init__(self, model: StageNetworks, options: StylizeOptions) -> None:
        self.model, self.options = model, options
        self._stats: dict[Path, dict[int, FeatureStats] | ImageError] = {}
        self._masks: dict[Path, np.ndarray | ImageError] = {}

    def get(self, path: Path, recolor: FeatureStats | None = None) -> dict[int, FeatureStats]:
        """Statistics of style ``path``; with ``recolor`` (a content's RGB statistics) of the recoloured style, not cached."""
        if recolor is not None:
            return self._compute(path, recolor)
        if path not in self._stats:
            try:
                self._stats[path] = self._compute(path, None)
            except ImageError as exc:
                self._stats[path] = exc
        got = self._stats[path]
        if isinstance(got, ImageError):
            raise got
        return got

    def _compute(self, path: Path, recolor: FeatureStats | None) -> dict[int, FeatureStats]:
        opts = self.options
        try:
            img = resize_long_side(array_to_tensor(read_image(path, max_pixels=opts.max_pixels)), opts.style_size)
        except ImageError as exc:
            raise ImageError(f"style {exc}") from None
        if recolor is not None:
            img = match_colors(img, recolor)
        if opts.tiling is None:
            return style_statistics(self.model, img, opts.levels)
        with canvas_from_array(img.numpy(), layout="chw") as canvas:  # a large style is tiled like a content
            return style_statistics_tiled(self.model, canvas, opts.levels, opts.tiling)

    def style_for(self, spec: StyleSpec, size: tuple[int, int], original: tuple[int, int],
                  recolor: FeatureStats | None = None) -> Style:  # fmt: skip
        """The `Target` or `Regions` of ``spec`` for a content of ``size`` (``original``: its size before resizing)."""
        stats = tuple(self.get(p, recolor) for p in spec.paths)
        if spec.mask is None:
            return Target(stats, spec.weights or (1.0,))
        labels = self.labels(spec.mask, len(spec.paths))
        if labels.shape != original:
            raise ImageError(
                f"{spec.mask}: the mask is {labels.shape[1]}x{labels.shape[0]} but the content is "
                f"{original[1]}x{original[0]}; give a mask of the content's size"
            )
        return Regions(resize_labels(labels, *size), tuple(Target((s,)) for s in stats))

    def labels(self, path: Path, styles: int) -> np.ndarray:
        """The mask's label map, read once; its label count must equal the number of styles."""
        if path not in self._masks:
            try:
                labels, colours = read_labels(path, max_pixels=self.options.max_pixels)
                check_label_count(path, colours, styles)
                self._masks[path] = labels
            except ImageError as exc:
                self._masks[path] = exc
        got = self._masks[path]
        if isinstance(got, ImageError):
            raise got
        return got


def run_batch(
    model: StageNetworks,
    pairs: list[Pair],
    options: StylizeOptions,
    on_result: Callable[[PairResult], None] | None = None,
    on_tile: TileCallback | None = None,
) -> BatchSummary:
    """Stylize ``pairs``; outputs are written atomically, so an interrupted batch resumes with ``skip_existing``."""
    styles = _StyleCache(model, options)
    summary = BatchSummary()
    for pair in pairs:
        if options.skip_existing and pair.output.exists():
            result = PairResult(pair, "skipped")
        else:
            result = _run_pair(model, pair, options, styles, on_tile)
            release_free_memory()  # the next image may be smaller: do not hold this one's peak
        summary.results.append(result)
        if on_result:
            on_result(result)
    return summary


def _run_pair(
    model: StageNetworks, pair: Pair, options: StylizeOptions, styles: _StyleCache, on_tile: TileCallback | None
) -> PairResult:
    t0 = time.perf_counter()
    try:
        if options.preserve_color != "match":  # a bad style fails before the content is read
            for path in pair.style.paths:
                styles.get(path)
        if options.tiling is None:
            pixels, original = _load_content(pair.content, options)
            content = array_to_tensor(pixels)
            del pixels
            h, w = content.shape[-2:]
            recolor = rgb_statistics(content) if options.preserve_color == "match" else None
            style = styles.style_for(pair.style, (h, w), original, recolor)
            out = stylize(model, content, style, method=options.method, alpha=options.alpha, levels=options.levels)
            if options.preserve_color == "luminance":
                out = keep_content_chroma(out, content)
            save_image(out, pair.output, options.format, options.depth)
        else:  # loads the content itself, so that nothing here keeps the decoded pixels alive
            h, w = _stylize_tiled_to_file(model, pair, styles, options, on_tile)
    except ImageError as exc:
        return PairResult(pair, "failed", str(exc), time.perf_counter() - t0)
    except ValueError as exc:  # e.g. a memory budget too small for this image's tiles
        return PairResult(pair, "failed", f"{pair.content}: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # out of memory, a backend or disk error: this pair fails, the batch goes on
        msg = f"{pair.content}: stylization failed ({type(exc).__name__}: {exc})"
        return PairResult(pair, "failed", msg, time.perf_counter() - t0)
    return PairResult(pair, "done", None, time.perf_counter() - t0, h * w / 1e6)


def _load_content(path: Path, options: StylizeOptions) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) pixels, resized to ``content_size`` when asked, and the (H, W) of the file."""
    pixels = read_image(path, max_pixels=options.max_pixels)
    original = (pixels.shape[0], pixels.shape[1])
    if options.content_size and max(original) != options.content_size:
        return resize_long_side(array_to_tensor(pixels), options.content_size).permute(1, 2, 0).numpy(), original
    return pixels, original


def _stylize_tiled_to_file(
    model: StageNetworks,
    pair: Pair,
    styles: _StyleCache,
    options: StylizeOptions,
    on_tile: TileCallback | None,
) -> tuple[int, int]:
    """Tiled cascade of ``pair.content`` into ``pair.output``; returns the content's (H, W).

    The decoded pixels live only until the content canvas holds them (300 MB
    at 100 MP that a caller's reference kept alive through every stage).
    """
    tiling = options.tiling
    assert tiling is not None
    pixels, original = _load_content(pair.content, options)
    h, w = pixels.shape[:2]
    content = content_canvas(model, pixels, tiling, options.levels)
    del pixels  # the canvas holds it now (on disk when large, on the GPU where it fits there)
    result: Canvas | None = None
    try:
        recolor = rgb_statistics(content) if options.preserve_color == "match" else None
        style = styles.style_for(pair.style, (h, w), original, recolor)
        result = stylize_tiled(
            model, content, style, tiling, method=options.method, alpha=options.alpha, levels=options.levels, on_tile=on_tile
        )
        if options.preserve_color == "luminance":
            keep_content_chroma_canvas(result, content)
        save_array(canvas_to_image(result, np.uint8 if options.depth == 8 else np.uint16), pair.output, options.format)
    finally:
        content.close()
        if result is not None:
            result.close()
    return h, w
