"""Batch stylization: every content x style pair, surviving bad files.

Each style is read and its statistics computed once for the whole batch. A
pair that fails (unreadable content or style, unwritable output) is recorded
with one message naming the file and the cause; the other pairs still run.
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
from ultrastyle.runtime.backends.base import StageNetworks
from ultrastyle.runtime.canvas import Canvas, canvas_from_array
from ultrastyle.runtime.cascade import DEFAULT_ALPHA, DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.tiled import TileCallback, TilingOptions, canvas_to_image, style_statistics_tiled, stylize_tiled
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


@dataclass(frozen=True)
class Pair:
    content: Path
    style: Path
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


def output_name(content: Path, style: Path, fmt: str) -> str:
    return f"{content.stem}_stylized_{style.stem}.{fmt}"


class OutputCollisionError(ValueError):
    """Two pairs would write the same output file."""


def plan_pairs(contents: list[Path], styles: list[Path], outdir: Path, fmt: str) -> list[Pair]:
    """Every content x style pair, in content-major order; refuses pairs that share an output name."""
    pairs = [Pair(c, s, outdir / output_name(c, s, fmt)) for c in contents for s in styles]
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

    def get(self, path: Path) -> dict[int, FeatureStats]:
        if path not in self._stats:
            try:
                opts = self.options
                img = resize_long_side(array_to_tensor(read_image(path, max_pixels=opts.max_pixels)), opts.style_size)
                if opts.tiling is None:
                    self._stats[path] = style_statistics(self.model, img, opts.levels)
                else:  # a large style is tiled like a content
                    with canvas_from_array(img.numpy(), layout="chw") as canvas:
                        self._stats[path] = style_statistics_tiled(self.model, canvas, opts.levels, opts.tiling)
            except ImageError as exc:
                self._stats[path] = exc
        got = self._stats[path]
        if isinstance(got, ImageError):
            raise ImageError(f"style {got}")
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
        summary.results.append(result)
        if on_result:
            on_result(result)
    return summary


def _run_pair(
    model: StageNetworks, pair: Pair, options: StylizeOptions, styles: _StyleCache, on_tile: TileCallback | None
) -> PairResult:
    t0 = time.perf_counter()
    try:
        stats = styles.get(pair.style)
        if options.tiling is None:
            content = array_to_tensor(_load_content(pair.content, options))
            h, w = content.shape[-2:]
            out = stylize(model, content, stats, method=options.method, alpha=options.alpha, levels=options.levels)
            save_image(out, pair.output, options.format, options.depth)
        else:
            h, w = _stylize_tiled_to_file(model, pair.content, stats, options, pair.output, on_tile)
    except ImageError as exc:
        return PairResult(pair, "failed", str(exc), time.perf_counter() - t0)
    except ValueError as exc:  # e.g. a memory budget too small for this image's tiles
        return PairResult(pair, "failed", f"{pair.content}: {exc}", time.perf_counter() - t0)
    except Exception as exc:  # out of memory, a backend or disk error: this pair fails, the batch goes on
        msg = f"{pair.content}: stylization failed ({type(exc).__name__}: {exc})"
        return PairResult(pair, "failed", msg, time.perf_counter() - t0)
    return PairResult(pair, "done", None, time.perf_counter() - t0, h * w / 1e6)


def _load_content(path: Path, options: StylizeOptions) -> np.ndarray:
    """(H, W, 3) pixels, resized to ``content_size`` when asked."""
    pixels = read_image(path, max_pixels=options.max_pixels)
    if options.content_size and max(pixels.shape[:2]) != options.content_size:
        return resize_long_side(array_to_tensor(pixels), options.content_size).permute(1, 2, 0).numpy()
    return pixels


def _stylize_tiled_to_file(
    model: StageNetworks,
    path: Path,
    stats: dict[int, FeatureStats],
    options: StylizeOptions,
    output: Path,
    on_tile: TileCallback | None,
) -> tuple[int, int]:
    """Tiled cascade from ``path`` to ``output``; returns the content's (H, W)."""
    tiling = options.tiling
    assert tiling is not None
    pixels = _load_content(path, options)
    h, w = pixels.shape[:2]
    content = canvas_from_array(pixels, disk_dir=tiling.canvas_dir(model.arch, h, w, options.levels))
    del pixels  # the canvas holds it now (on disk when large)
    result: Canvas | None = None
    try:
        result = stylize_tiled(
            model, content, stats, tiling, method=options.method, alpha=options.alpha, levels=options.levels, on_tile=on_tile
        )
        save_array(canvas_to_image(result, np.uint8 if options.depth == 8 else np.uint16), output, options.format)
    finally:
        content.close()
        if result is not None:
            result.close()
    return h, w
