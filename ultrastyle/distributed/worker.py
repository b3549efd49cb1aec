"""The Ray actor: one runner per actor, running a content's pairs or a share of one stage's tiles.

`StylizeWorker` is a plain class here; `distributed.pool` makes it a Ray
actor (``ray.remote``), so this module imports no Ray. It reuses the local
pipeline as it is: `runtime.batch.stylize_content` for a content's pairs
(outputs written atomically, failures reported as the local batch reports
them) and `runtime.tiled.encode_statistics` / `decode_tiles` for a share of
a stage's tiles, reading and writing `ZarrCanvas` arrays on a shared folder.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ultrastyle.core.plan import StagePlan
from ultrastyle.core.styles import Style
from ultrastyle.core.traits import RunnerTraits
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.distributed.zarr_canvas import open_array
from ultrastyle.errors import Remedies
from ultrastyle.io.atomic import HOST_TAG, disk_full
from ultrastyle.io.images import ImageError
from ultrastyle.io.pyramid import image_size, output_meta, save_output
from ultrastyle.io.paths import file_signature
from ultrastyle.core.arch import ArchSpec
from ultrastyle.io.sources import Source
from ultrastyle.runtime.batch import StyleBook, StylizeOptions, _failure, output_megapixels, stylize_content
from ultrastyle.runtime.decode import decode
from ultrastyle.runtime.pairs import Pair, PairResult, not_made_disk_full
from ultrastyle.runtime.tiled import decode_tiles, encode_statistics, stylize_stage_tiled

# Per style source: its per-stage statistics, or the error that fails its pairs.
StyleTable = Mapping[Source, "dict[int, FeatureStats] | ImageError"]
# The output whose write found its disk full, and that error (a plain OSError: it crosses to the driver).
DiskFull = tuple[Path, OSError]
# Environment a worker takes from the driver (a local cluster's workers inherit the rest).
FORWARDED_ENV = ("ULTRASTYLE_HOME", "ULTRASTYLE_MALLOC")


@dataclass(frozen=True)
class RunnerSpec:
    """How every worker opens its runner (`runtime.backends.select.open_runner`)."""

    model: str
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    threads: int = 1
    stages: tuple[int, ...] | None = None
    compile: bool = False  # the torch backend's torch.compile engine, in every worker


@dataclass(frozen=True)
class WorkerInfo:
    """What the driver learns from a started worker; ``error``: why its runner did not open (the rest unset)."""

    pid: int
    node: str
    error: str | None = None
    remedy: Remedies = None  # the fix ``error`` suggests (`errors.Remedy`), for the driver's front end to show its way
    backend: str = ""
    stages: tuple[int, ...] = ()
    arch: ArchSpec | None = None
    traits: RunnerTraits | None = None
    host: str = ""  # socket.gethostname(): whether ``pid`` is a process of the driver's machine
    host_tag: str = ""  # `io.atomic.HOST_TAG`: what its temp files' names carry, so the driver sweeps a killed worker's


class SharedStyleBook(StyleBook):
    """A `StyleBook` whose statistics were computed once for the whole job (``table``); recoloured styles are computed here."""

    def __init__(self, model: object, options: StylizeOptions, table: StyleTable) -> None:
        super().__init__(model, options)  # type: ignore[arg-type]
        self._table = table

    def get(self, src: Source, recolor: FeatureStats | None = None) -> dict[int, FeatureStats]:
        if recolor is None and src in self._table:
            got = self._table[src]
            if isinstance(got, ImageError):
                raise got
            return got
        return super().get(src, recolor)


class StylizeWorker:
    """One runner (opened from ``spec``), for a content's pairs or shares of a stage's tiles."""

    def __init__(self, spec: RunnerSpec, env: Mapping[str, str]) -> None:
        os.environ.update(env)
        self.error: str | None = None
        self.remedy: Remedies = None
        self.runner = None
        try:
            from ultrastyle.runtime.backends.select import open_runner

            self.runner = open_runner(
                spec.model, backend=spec.backend, device=spec.device, stages=spec.stages, threads=spec.threads,
                precision=spec.precision, compile=spec.compile, progress=False,
            ).activate()  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported by `info`, raised on the driver with the cause
            self.error = str(exc) or type(exc).__name__
            self.remedy = getattr(exc, "remedy", None)

    def info(self) -> WorkerInfo:
        import ray

        node = ray.get_runtime_context().get_node_id()
        if self.runner is None:
            return WorkerInfo(os.getpid(), node, self.error or "the runner did not open", self.remedy, host=socket.gethostname(),
                              host_tag=HOST_TAG)  # fmt: skip
        r = self.runner
        return WorkerInfo(os.getpid(), node, backend=r.backend, stages=r.stages, arch=r.arch, traits=r.traits, host=socket.gethostname(),
                          host_tag=HOST_TAG)  # fmt: skip

    def style_statistics(self, src: Source, options: StylizeOptions, recolor: FeatureStats | None = None) -> dict[int, FeatureStats] | ImageError:
        """Per-stage statistics of one style (of the style recoloured to ``recolor``), or the ImageError that fails its pairs."""
        try:
            return StyleBook(self.runner, options).get(src, recolor)  # type: ignore[arg-type]
        except ImageError as exc:
            return exc

    def stylize_pairs(
        self,
        content: Source,
        pairs: Sequence[Pair],
        options: StylizeOptions,
        styles: StyleTable,
        written: Sequence[tuple[int, int] | None] | None = None,
    ) -> tuple[list[PairResult], DiskFull | None]:
        """Every pair of one content, written atomically; results as the local batch makes them (images not returned),
        and the output whose write found its disk full (None if none did): the pairs after it are not computed, and the
        driver stops the batch (every later output there would fail after its work).

        ``written``: on a retry, each output's signature (`file_signature`) when the job began; an output
        whose signature has changed since was written by an earlier attempt and is not written again.
        """
        results: list[PairResult | None] = [None] * len(pairs)
        full = None
        todo = []
        for i, p in enumerate(pairs):
            if written is not None and p.output is not None and file_signature(p.output) not in (None, written[i]):
                results[i] = PairResult(p, "done", None, 0.0, output_megapixels(content, options))
            else:
                todo.append(i)
        if todo:
            full = self._stylize(content, [pairs[i] for i in todo], options, styles, results, todo)
        return [r for r in results if r is not None], full

    def _stylize(self, content: Source, pairs: list[Pair], options: StylizeOptions, styles: StyleTable,
                 results: list[PairResult | None], slots: list[int]) -> DiskFull | None:  # fmt: skip
        try:
            decoded = decode(content, options)
        except Exception as exc:  # noqa: BLE001 - the content's pairs fail, the job goes on
            for i, p in zip(slots, pairs):
                results[i] = _failure(p, exc)
            return None
        slot = {id(p): i for i, p in zip(slots, pairs)}
        full: DiskFull | None = None

        def stopped(pair: Pair) -> PairResult | None:
            return None if full is None else not_made_disk_full(pair, *full)

        def on_output(pair: Pair, out: object, seconds: float) -> None:
            nonlocal full
            try:
                assert pair.output is not None
                if (result := stopped(pair)) is not None:
                    results[slot[id(pair)]] = result
                    return
                save_output(out, pair.output, options.format, depth=options.depth, png_level=options.png_level,  # type: ignore[arg-type]
                            pyramid=options.pyramid, meta=output_meta(pair.content, out, options.metadata))  # type: ignore[arg-type]  # fmt: skip
                h, w = image_size(out)  # type: ignore[arg-type]
                results[slot[id(pair)]] = PairResult(pair, "done", None, seconds, h * w / 1e6)
            except Exception as exc:  # noqa: BLE001 - this pair fails, the others go on
                results[slot[id(pair)]] = _failure(pair, exc, seconds)
                if full is None and (cause := disk_full(exc)) is not None and pair.output is not None:
                    full = (pair.output, OSError(cause.errno, cause.strerror))
            finally:
                if hasattr(out, "close"):
                    out.close()  # type: ignore[union-attr]

        book = SharedStyleBook(self.runner, options, styles)
        got = stylize_content(self.runner, decoded, pairs, book, options, on_output=on_output, skip=stopped)  # type: ignore[arg-type]
        for i, r in zip(slots, got):
            if r is not None:
                results[i] = r
        return full

    # --- one image across the cluster: shares of a stage's tiles -------------------------------------------

    def encode_tiles(self, stage: int, src: str, plan: StagePlan, features: str | None, tiles: Sequence[int],
                     keep_bytes: int | None) -> list[FeatureStats]:  # fmt: skip
        """Pass 1 of ``tiles``: one float64 `FeatureStats` per tile (the driver sums them in tile order, as one machine does)."""
        canvas, feats = open_array(src), open_array(features) if features else None
        return [
            encode_statistics(self.runner, stage, canvas, plan, feats, keep_bytes=keep_bytes, only=(i,))  # type: ignore[misc]
            for i in tiles
        ]

    def decode_tiles(self, stage: int, src: str, dst: str, plan: StagePlan, a: torch.Tensor, b: torch.Tensor,
                     features: str | None, tiles: Sequence[int], keep_bytes: int | None) -> int:  # fmt: skip
        """Pass 2 of ``tiles``: each core written into ``dst`` (its own chunk); returns how many."""
        feats = open_array(features) if features else None
        decode_tiles(self.runner, stage, open_array(src), open_array(dst), plan, a, b, feats, keep_bytes=keep_bytes,  # type: ignore[arg-type]
                     only=frozenset(tiles))  # fmt: skip
        return len(tiles)

    def whole_stage(self, stage: int, src: str, dst: str, plan: StagePlan, style: Style, method: str, alpha: float) -> int:
        """A stage planned as one tile: the whole-image stage, as on one machine."""
        stylize_stage_tiled(self.runner, open_array(src), style, plan, method=method, alpha=alpha, out=open_array(dst))  # type: ignore[arg-type]
        return 1


def stats_sum(parts: Sequence[FeatureStats], channels: int) -> FeatureStats:
    """The tile statistics summed in tile order from empty, as `runtime.tiled.encode_statistics` sums them."""
    total = FeatureStats.empty(channels)
    for p in parts:
        total = total + p
    return total


def as_float32_band(pixels: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of (H, W, 3) pixels as a (3, rows, W) float32 band in [0, 1], as `core.canvas.canvas_from_array` scales them."""
    from ultrastyle.core.canvas import sample_peak

    return np.moveaxis(pixels[r0:r1], 2, 0).astype(np.float32) / np.float32(sample_peak(pixels.dtype))
