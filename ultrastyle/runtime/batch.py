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

from ultrastyle.io.images import DEFAULT_MAX_PIXELS, ImageError, load_image, resize_long_side, save_image
from ultrastyle.models.pretrained import StyleModel
from ultrastyle.runtime.cascade import DEFAULT_ALPHA, DEFAULT_LEVELS, style_statistics, stylize
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


def plan_pairs(contents: list[Path], styles: list[Path], outdir: Path, fmt: str) -> list[Pair]:
    """Every content x style pair, in content-major order."""
    return [Pair(c, s, outdir / output_name(c, s, fmt)) for c in contents for s in styles]


class _StyleCache:
    """Style statistics per style file, computed on first use; a bad style fails all its pairs once."""

    def __init__(self, model: StyleModel, options: StylizeOptions) -> None:
        self.model, self.options = model, options
        self._stats: dict[Path, dict[int, FeatureStats] | ImageError] = {}

    def get(self, path: Path) -> dict[int, FeatureStats]:
        if path not in self._stats:
            try:
                img = resize_long_side(load_image(path, max_pixels=self.options.max_pixels), self.options.style_size)
                self._stats[path] = style_statistics(self.model, img, self.options.levels)
            except ImageError as exc:
                self._stats[path] = exc
        got = self._stats[path]
        if isinstance(got, ImageError):
            raise ImageError(f"style {got}")
        return got


def run_batch(
    model: StyleModel,
    pairs: list[Pair],
    options: StylizeOptions,
    on_result: Callable[[PairResult], None] | None = None,
) -> BatchSummary:
    """Stylize ``pairs``; outputs are written atomically, so an interrupted batch resumes with ``skip_existing``."""
    styles = _StyleCache(model, options)
    summary = BatchSummary()
    for pair in pairs:
        if options.skip_existing and pair.output.exists():
            result = PairResult(pair, "skipped")
        else:
            result = _run_pair(model, pair, options, styles)
        summary.results.append(result)
        if on_result:
            on_result(result)
    return summary


def _run_pair(model: StyleModel, pair: Pair, options: StylizeOptions, styles: _StyleCache) -> PairResult:
    t0 = time.perf_counter()
    try:
        stats = styles.get(pair.style)
        content = resize_long_side(load_image(pair.content, max_pixels=options.max_pixels), options.content_size)
        out = stylize(model, content, stats, method=options.method, alpha=options.alpha, levels=options.levels)
        save_image(out, pair.output, options.format)
    except ImageError as exc:
        return PairResult(pair, "failed", str(exc), time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory on one huge image
        msg = f"{pair.content}: stylization failed ({type(exc).__name__}: {exc})"
        return PairResult(pair, "failed", msg, time.perf_counter() - t0)
    mp = content.shape[-1] * content.shape[-2] / 1e6
    return PairResult(pair, "done", None, time.perf_counter() - t0, mp)
