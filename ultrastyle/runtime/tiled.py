"""Exact tiled stylization: any image size within a fixed memory budget.

Per stage (DESIGN.md §3):

1. Pass 1 encodes each tile with the encoder's halo and accumulates count, Σf
   and Σffᵀ over the tile's core only, so each feature pixel counts once. Where
   encoding is expensive relative to the feature map's size (the deep stages),
   the core features are kept in a feature canvas.
2. The affine map is fitted from the global content statistics and the style's.
3. Pass 2 decodes each tile: from the cached features with the decoder's halo,
   or by re-encoding with the full stage halo. Each tile's core is written into
   the output canvas.

With mask regions (`core.styles.Regions`) pass 1 accumulates statistics
per region, and features are always cached, so that pass 2 can send each
feature pixel through its region's map before decoding.

With the exact halo the result equals the whole-image cascade
(`runtime.cascade`) up to float rounding; the tests hold it to 1e-4.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array, sample_peak
from ultrastyle.core.padding import padded_size, reflect_index
from ultrastyle.core.receptive import decoder_radius, encoder_radius, round_up, stage_radius
from ultrastyle.core.styles import (
    Affine, Regions, Style, Target, apply_regions, as_style, identity_map, region_statistics,
)  # fmt: skip
from ultrastyle.core.tile_memory import core_for_budget, region_side_for_budget
from ultrastyle.core.tiling import Span, Tile, plan_tiles
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.models.spec import ArchSpec
from ultrastyle.runtime.backends.base import Runner, StageNetworks
from ultrastyle.runtime.cascade import stylize_stage
from ultrastyle.runtime.memory import available_bytes, heap_factor, release_free_memory, trim_heap

DEFAULT_MAX_MEMORY = 2 * 2**30
# A device budget (GPU memory) holds an image's canvases while they take at most this share of it,
# leaving the rest to the tiles; host canvases of a device budget take at most this share of free RAM.
DEVICE_CANVAS_SHARE = 0.5
HOST_CANVAS_SHARE = 0.5
# Cache relu{k}_1 features between the passes when re-encoding would cost more
# than this many multiply-adds per cached float (disk or RAM traffic is cheaper).
CACHE_MACS_PER_VALUE = 200

TileCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TilingOptions:
    """How to tile: ``tile`` (core side, px) overrides the ``max_memory`` planner."""

    tile: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY
    halo: int | None = None  # None: exact (the full receptive field)
    scratch_dir: Path | None = None  # where disk canvases go (default: the system temp folder)
    ram_canvas_limit: int | None = None  # an image whose host canvases need more goes to disk; None: see canvas_site
    cache_features: bool | None = None  # None: decided per stage by encoder cost
    uniform_tiles: bool | None = None  # one region shape per pass (`core.tiling`); None: the runner's preference
    # One tile without halo wherever the image's area fits the budget's square region, whatever its
    # shape; off where regions are bounded per side (TensorRT profiles). None: the runner's
    # `Runner.bounded_regions` (`plan_for`); on for `plan_stage` called directly.
    whole_if_area_fits: bool | None = None
    # What max_memory bounds: "host" (this process's RAM: tiles and RAM canvases) or "device" (GPU
    # memory: tiles, and canvases that fit beside them). None: the runner's (`Runner.budget_memory`).
    budget: str | None = None

    def for_runner(self, model: StageNetworks) -> TilingOptions:
        """These options with every None that means "ask the runner" resolved from ``model``.

        A bare StyleModel: clipped regions, mixed tile shapes, the budget where its tensors live.
        """
        device = getattr(model, "device", torch.device("cpu"))
        budget = self.budget or getattr(model, "budget_memory", None) or ("host" if device.type == "cpu" else "device")
        if budget not in ("host", "device"):
            raise ValueError(f"budget must be 'host' or 'device', got {budget!r}")
        return replace(
            self,
            uniform_tiles=getattr(model, "uniform_tiles", False) if self.uniform_tiles is None else self.uniform_tiles,
            whole_if_area_fits=not getattr(model, "bounded_regions", False) if self.whole_if_area_fits is None else self.whole_if_area_fits,
            budget=budget,
        )

    def canvas_bytes(self, spec: ArchSpec, height: int, width: int, levels: tuple[int, ...]) -> int:
        """Canvas bytes alive at once for one image: the content, a stage's input and output, the largest feature cache."""
        image = 3 * height * width * 4 * (3 if len(set(levels)) > 1 else 2)
        feats = [
            spec.feature_channels(k) * (padded_size(height, spec.grid(k)) // spec.grid(k))
            * (padded_size(width, spec.grid(k)) // spec.grid(k)) * 4
            for k in set(levels)
            if self.caches(spec, k)
        ]  # fmt: skip
        return image + max(feats, default=0)

    def canvas_site(
        self, spec: ArchSpec, height: int, width: int, levels: tuple[int, ...], device: torch.device | None = None
    ) -> CanvasSite:
        """Where all canvases of one image go, given the device the runner's tensors live on.

        - A host budget: in RAM while they take at most a quarter of
          ``max_memory`` (or ``ram_canvas_limit``), the tiles getting the rest;
          else on disk.
        - A device budget (resolve ``budget`` with `for_runner` first): on
          ``device`` while they take at most `DEVICE_CANVAS_SHARE` of
          ``max_memory`` and the runner's tensors live there (PyTorch on CUDA;
          not TensorRT, whose tiles cross as host arrays); else in RAM while
          they take at most ``ram_canvas_limit`` or `HOST_CANVAS_SHARE` of the
          RAM available now (the budget is GPU memory, not RAM); else on disk.
        """
        need = self.canvas_bytes(spec, height, width, levels)
        if self.budget == "device":
            if device is not None and device.type != "cpu" and need <= self.max_memory * DEVICE_CANVAS_SHARE:
                return CanvasSite(device=device)
            limit = int(available_bytes() * HOST_CANVAS_SHARE) if self.ram_canvas_limit is None else self.ram_canvas_limit
        else:
            limit = self.max_memory // 4 if self.ram_canvas_limit is None else self.ram_canvas_limit
        if need <= limit:
            return CanvasSite()
        return CanvasSite(disk_dir=str(self.scratch_dir or tempfile.gettempdir()))

    def for_image(self, spec: ArchSpec, height: int, width: int, levels: tuple[int, ...], site: CanvasSite) -> TilingOptions:
        """The options one image's tiles are planned with, its canvases at ``site`` (`canvas_site`).

        Canvases in the budget's memory share it with the tiles.
        """
        shares = site.device is not None if self.budget == "device" else site.disk_dir is None
        if self.tile is None and shares:
            return replace(self, max_memory=self.max_memory - self.canvas_bytes(spec, height, width, levels))
        return self

    def cache_bytes(self, model: StageNetworks) -> int:
        """What the runner and the heap may keep between tiles before handing it back (`_after_tile`).

        A share of the budget: the runner's `Runner.cache_share` (a bare model: the base class's).
        """
        return int(self.max_memory * getattr(model, "cache_share", Runner.cache_share))

    def caches(self, spec: ArchSpec, stage: int) -> bool:
        """Whether pass 1 keeps the stage's features for pass 2."""
        if self.cache_features is not None:
            return self.cache_features
        return encoder_macs_per_value(spec, stage) >= CACHE_MACS_PER_VALUE


@dataclass(frozen=True)
class StagePlan:
    """Halos and tile cores of one stage on one image size (pixels unless noted)."""

    stage: int
    grid: int
    height: int  # grid-padded
    width: int
    enc_halo: int
    full_halo: int
    dec_halo: int  # in feature pixels
    encode_core: int
    decode_core: int
    cache: bool
    uniform: bool = False

    def encode_tiles(self) -> list[Tile]:
        return plan_tiles(self.height, self.width, self.encode_core, self.enc_halo, self.grid, self.uniform)

    def decode_tiles(self) -> list[Tile]:
        """Pass-2 tiles: in feature pixels when features are cached, else in image pixels."""
        if self.cache:
            g = self.grid
            return plan_tiles(self.height // g, self.width // g, self.decode_core // g, self.dec_halo, 1, self.uniform)
        return plan_tiles(self.height, self.width, self.decode_core, self.full_halo, self.grid, self.uniform)


def encoder_macs_per_value(spec: ArchSpec, stage: int) -> float:
    """Encoder multiply-adds per image pixel over its feature floats per image pixel."""
    g = spec.grid(stage)
    return spec.macs_per_pixel(stage, "encoder") / (spec.feature_channels(stage) / (g * g))


def plan_stage(
    spec: ArchSpec, stage: int, height: int, width: int, options: TilingOptions, memory_factor: float = 1.0
) -> StagePlan:
    """Halos from the receptive fields, cores from ``options`` (tile or memory budget).

    ``memory_factor`` is the backend's measured peak over the planner's model (`Runner.memory_factor`).
    """
    g = spec.grid(stage)
    enc_halo = round_up(encoder_radius(spec, stage), g)
    full_halo = round_up(stage_radius(spec, stage), g)
    dec_halo = decoder_radius(spec, stage)
    if options.halo is not None:  # approximate: no halo larger than N, never more than exact
        enc_halo = min(enc_halo, round_up(options.halo, g))
        full_halo = min(full_halo, round_up(options.halo, g))
        dec_halo = min(dec_halo, round_up(options.halo, g) // g)
    cache = options.caches(spec, stage)
    height, width = padded_size(height, g), padded_size(width, g)
    if options.tile is not None:
        encode_core = decode_core = max(g, options.tile // g * g)
    elif options.whole_if_area_fits is not False and height * width <= region_side_for_budget(
        spec, stage, options.max_memory, factor=memory_factor
    ) ** 2:  # the memory is the area's: a 2 MP image, wider than the square, still runs whole
        encode_core = decode_core = max(height, width)
    else:
        encode_core = core_for_budget(spec, stage, options.max_memory, enc_halo, factor=memory_factor)
        decode_core = core_for_budget(spec, stage, options.max_memory, dec_halo * g if cache else full_halo, factor=memory_factor)
    return StagePlan(
        stage, g, height, width, enc_halo, full_halo, dec_halo,
        encode_core, decode_core, bool(cache), bool(options.uniform_tiles),
    )  # fmt: skip


def read_region(src: Canvas, rows: Span, cols: Span, device: torch.device | None = None) -> torch.Tensor:
    """(1, C, rows, cols) of the grid-padded image on ``device`` (default CPU): indices past the edge are mirrored in."""
    _, h, w = src.shape
    r = reflect_index(torch.arange(rows.start, rows.stop), h).numpy()
    c = reflect_index(torch.arange(cols.start, cols.stop), w).numpy()
    return src.read_tensor(r, c, device or torch.device("cpu"))[None]


@torch.inference_mode()
def encode_statistics(
    model: StageNetworks,
    stage: int,
    src: Canvas,
    plan: StagePlan,
    features: Canvas | None = None,
    on_tile: TileCallback | None = None,
    keep_bytes: int | None = None,
    regions: Regions | None = None,
) -> FeatureStats | list[FeatureStats]:
    """Pass 1: content statistics over every tile's core; optionally keep the core features.

    ``keep_bytes``: after each tile the runner may hold at most this much
    memory cached from earlier tiles (`Runner.release_memory`); None: no limit.
    With ``regions``: one `FeatureStats` per region instead.
    """
    device, g = model.device, plan.grid
    channels = model.arch.feature_channels(stage)
    stats: FeatureStats | list[FeatureStats]
    stats = FeatureStats.empty(channels) if regions is None else [FeatureStats.empty(channels)] * regions.count
    tiles = plan.encode_tiles()
    for i, t in enumerate(tiles):
        ft = t.scaled(g)
        x = read_region(src, t.region_rows, t.region_cols, device)
        if regions is None:
            part, core = _core_statistics(model, stage, x, *ft.core_in_region, features is not None)
            stats = stats + part
        else:
            core = model.encode_core(stage, x, *ft.core_in_region)
            labels = regions.feature_labels(g, slice(t.rows.start // g, t.rows.stop // g), slice(t.cols.start // g, t.cols.stop // g))
            stats = [a + b for a, b in zip(stats, region_statistics(core, labels, regions.count))]
        if features is not None:
            features.write_tensor(ft.rows.start, ft.cols.start, core[0].float())
        _after_tile(model, keep_bytes)
        if on_tile:
            on_tile(f"stage {stage} statistics", i + 1, len(tiles))
    return stats


@torch.inference_mode()
def decode_tiles(
    model: StageNetworks,
    stage: int,
    src: Canvas,
    dst: Canvas,
    plan: StagePlan,
    a: torch.Tensor,
    b: torch.Tensor,
    features: Canvas | None = None,
    on_tile: TileCallback | None = None,
    keep_bytes: int | None = None,
    regions: tuple[Regions, list[Affine]] | None = None,
) -> None:
    """Pass 2: (encode ->) A f + b -> decode per tile; write each core, cropped to the image (``keep_bytes``: as pass 1).

    ``regions``: the mask and one map per region, applied to the cached
    ``features`` (required then) before decoding; ``a``, ``b`` are ignored.
    """
    device, g = model.device, plan.grid
    _, h, w = dst.shape
    tiles = plan.decode_tiles()
    if regions is not None:
        if features is None:
            raise ValueError("mask regions need the stage's features cached between the passes")
        a, b = identity_map(model.arch.feature_channels(stage))  # the features arrive transformed
    for i, t in enumerate(tiles):
        if features is not None:
            f = features.read_tensor(slice(t.region_rows.start, t.region_rows.stop),
                                     slice(t.region_cols.start, t.region_cols.stop), device)[None]  # fmt: skip
            if regions is not None:
                mask, maps = regions
                labels = mask.feature_labels(g, slice(t.region_rows.start, t.region_rows.stop),
                                         slice(t.region_cols.start, t.region_cols.stop))  # fmt: skip
                f = apply_regions(f, labels, maps)
            rs, cs = t.core_in_region
            y = model.decode_core(stage, f, a, b, slice(rs.start * g, rs.stop * g), slice(cs.start * g, cs.stop * g))
            scale = g
        else:
            x = read_region(src, t.region_rows, t.region_cols, device)
            y, scale = model.stylize_core(stage, x, a, b, *t.core_in_region), 1
        r0, c0 = t.rows.start * scale, t.cols.start * scale
        if r0 < h and c0 < w:
            dst.write_tensor(r0, c0, y[0, :, : h - r0, : w - c0].float())
        _after_tile(model, keep_bytes)
        if on_tile:
            on_tile(f"stage {stage} decode", i + 1, len(tiles))


def stylize_stage_tiled(
    model: StageNetworks,
    stage: int,
    src: Canvas,
    style: Style,
    options: TilingOptions,
    *,
    method: str,
    alpha: float,
    site: CanvasSite = CanvasSite(),
    on_tile: TileCallback | None = None,
    out: Canvas | None = None,
) -> Canvas:
    """One stage over a whole canvas, tile by tile, into ``out`` or a new canvas at ``site``.

    ``style``: as in `stylize_tiled`. Every pixel of ``out`` is overwritten, so a spare canvas from an earlier
    stage can be reused: its pages are already mapped, which saves the page
    faults of a fresh one.
    """
    c, h, w = src.shape
    if out is not None and out.shape != src.shape:
        raise ValueError(f"output canvas has shape {out.shape}, the stage's input {src.shape}")
    target = as_style(style)
    regions = target if isinstance(target, Regions) else None
    if regions is not None:
        options = replace(options, cache_features=True)
    plan = plan_for(model, stage, h, w, options)
    if len(plan.encode_tiles()) == 1 and len(plan.decode_tiles()) == 1:
        try:
            return _whole_stage(model, stage, src, target, method, alpha, out, site)
        finally:
            _release(model, options.cache_bytes(model))
    feats = None
    if plan.cache:
        feats = Canvas.at(site, model.arch.feature_channels(stage), plan.height // plan.grid, plan.width // plan.grid)
    try:
        keep = options.cache_bytes(model)
        content = encode_statistics(model, stage, src, plan, feats, on_tile, keep, regions)
        _release(model, keep)
        if regions is not None:  # decode_tiles applies the per-region maps itself
            maps = regions.fit(method, stage, content, alpha)
            a, b = identity_map(model.arch.feature_channels(stage))
        else:
            assert isinstance(target, Target) and isinstance(content, FeatureStats)
            a, b = target.fit(method, stage, content, alpha)
        dst = out if out is not None else Canvas.at(site, c, h, w)
        try:
            decode_tiles(model, stage, src, dst, plan, a, b, feats, on_tile, keep, None if regions is None else (regions, maps))
        except BaseException:
            if out is None:
                dst.close()
            raise
    finally:
        if feats is not None:
            feats.close()
        _release(model, keep)
    return dst


def _whole_stage(
    model: StageNetworks, stage: int, src: Canvas, target: Target | Regions, method: str, alpha: float,
    out: Canvas | None, site: CanvasSite,
) -> Canvas:
    """A stage whose plan is one tile in both passes: the whole-image stage itself.

    Same result as two passes over one tile, without encoding twice or
    round-tripping features through a canvas (what made small images slower
    tiled than whole).
    """
    c, h, w = src.shape
    x = src.read_tensor(slice(None), slice(None), model.device)[None]
    y = stylize_stage(model, x, stage, target, method=method, alpha=alpha)
    del x
    dst = out if out is not None else Canvas.at(site, c, h, w)
    dst.write_tensor(0, 0, y[0].float())
    return dst


def style_statistics_tiled(
    model: StageNetworks, style: Canvas, levels: tuple[int, ...], options: TilingOptions
) -> dict[int, FeatureStats]:
    """Per-stage style statistics by tiled pass 1 (equal to `cascade.style_statistics`)."""
    _, h, w = style.shape
    stats = {}
    for k in sorted(set(levels)):
        stats[k] = encode_statistics(model, k, style, plan_for(model, k, h, w, options))
        _release(model, options.cache_bytes(model))
    return stats


def _after_tile(model: StageNetworks, keep_bytes: int | None) -> None:
    """Mid-pass: the runner and the C heap hand back what they keep beyond ``keep_bytes``.

    The runner by its own rule (an ORT arena fragments over many tiles); the
    heap once the resident set has grown by more than that since its last
    trim (`memory.keep_freed_memory`). Measured at 40 MP, 1 GB budget,
    PyTorch: trimming past half the budget 4.89 s/MP and 1.65 GiB peak, past
    the whole budget 3.55 s/MP and 2.26 GiB (over the 2 GB the budget
    promises); `Runner.cache_share` sets the share.
    """
    if keep_bytes is None:
        return
    release = getattr(model, "release_memory", None)
    if release is not None:
        release(keep_bytes)
    trim_heap(keep_bytes)


def _release(model: StageNetworks, keep_bytes: int) -> None:
    """Between passes: as after a tile, then the C heap's free pages too."""
    _after_tile(model, keep_bytes)
    release_free_memory()


def _core_statistics(
    model: StageNetworks, stage: int, x: torch.Tensor, rows: slice, cols: slice, keep: bool
) -> tuple[FeatureStats, torch.Tensor | None]:
    """A runner's own pass-1 reduction where it has one (`Runner.encode_core_statistics`)."""
    own = getattr(model, "encode_core_statistics", None)
    if own is not None:
        return own(stage, x, rows, cols, keep)
    core = model.encode_core(stage, x, rows, cols)
    return FeatureStats.of(core), (core if keep else None)


def plan_for(model: StageNetworks, stage: int, height: int, width: int, options: TilingOptions) -> StagePlan:
    """`plan_stage` with the runner's memory factor and, unless the options say, its tile-shape preference and region bounds.

    A runner whose regions have a largest size (TensorRT's engine profiles)
    fits the options to it first (``fit_tiling(options, stages)``), so
    library callers get tiles its engines accept without fitting them
    themselves. A bare StyleModel has none of these: the eager PyTorch factor
    (`memory.heap_factor`), clipped regions.
    """
    options = options.for_runner(model)
    fit = getattr(model, "fit_tiling", None)
    if fit is not None:
        options = fit(options, (stage,))
    return plan_stage(model.arch, stage, height, width, options, _memory_factor(model, stage))


def _memory_factor(model: StageNetworks, stage: int) -> float:
    factor = getattr(model, "memory_factor", None)  # a bare StyleModel is the eager PyTorch the planner models
    return factor(stage) if factor else heap_factor()


def stylize_tiled(
    model: StageNetworks,
    content: Canvas,
    style: Style,
    options: TilingOptions,
    *,
    method: str,
    alpha: float,
    levels: tuple[int, ...],
    on_tile: TileCallback | None = None,
) -> Canvas:
    """The cascade over ``levels`` on a canvas; the caller closes ``content`` and the result.

    ``style``: per-stage statistics of one style (`style_statistics_tiled`),
    a weighted `Target`, or `Regions` (a mask the content's size).
    """
    _, h, w = content.shape
    target = as_style(style)
    if isinstance(target, Regions):
        target.check_size(h, w)
        options = replace(options, cache_features=True)  # pass 2 transforms cached features per region
    options = options.for_runner(model)
    site = options.canvas_site(model.arch, h, w, levels, model.device)
    options = options.for_image(model.arch, h, w, levels, site)
    x, spare = content, None  # stage outputs alternate between two canvases
    try:
        for k in levels:
            y = stylize_stage_tiled(
                model, k, x, target, options,
                method=method, alpha=alpha, site=site, on_tile=on_tile, out=spare,
            )  # fmt: skip
            spare = x if x is not content else None
            x = y
    except BaseException:
        if x is not content:
            x.close()
        raise
    finally:
        if spare is not None:
            spare.close()
    return x


def content_canvas(
    model: StageNetworks, pixels: np.ndarray, options: TilingOptions, levels: tuple[int, ...], layout: str = "hwc"
) -> Canvas:
    """The content canvas of ``pixels`` where `stylize_tiled` keeps this image's canvases (RAM, disk or the GPU)."""
    h, w = pixels.shape[:2] if layout == "hwc" else pixels.shape[1:]
    site = options.for_runner(model).canvas_site(model.arch, h, w, levels, model.device)
    return canvas_from_array(pixels, layout=layout, disk_dir=site.disk_dir, device=site.device)


def canvas_to_image(canvas: Canvas, dtype: type = np.uint8, band: int = 512) -> np.ndarray:
    """(H, W, 3) uint8/uint16 of a [0, 1] canvas, clamped and rounded, converted band by band."""
    c, h, w = canvas.shape
    peak = sample_peak(dtype)
    out = np.empty((h, w, c), dtype)
    for r in range(0, h, band):
        # In torch, which uses every core: the same float32 arithmetic, truncated as numpy's astype would.
        blk = torch.from_numpy(canvas.rows_band(r, min(h, r + band))).clamp_(0, 1).mul_(peak).add_(0.5).permute(1, 2, 0)
        if out.dtype == np.uint8:
            torch.from_numpy(out[r : r + band]).copy_(blk)
        else:  # uint16: no torch dtype before 2.3
            out[r : r + band] = blk.numpy().astype(dtype)
    return out
