"""Exact tiled stylization: any image size within a fixed memory budget.

Per stage (docs/design.md, "Exact tiling"):

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
(`runtime.cascade`) up to float rounding; the tests hold it to 1e-4. A stage
planned as one tile in both passes runs as the whole-image stage itself, so
``TilingOptions.unbounded()`` gives the cascade's result bit for bit.

What tiles each stage gets is decided once per image, before any work
(`core.plan.plan_image`, from the options and the runner's `RunnerTraits`);
this module only runs the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array, sample_peak
from ultrastyle.core.padding import reflect_index
from ultrastyle.core.plan import ImagePlan, StagePlan, TilingOptions, plan_image, plan_stages
from ultrastyle.core.styles import (
    Affine, Regions, Style, Target, apply_regions, as_style, identity_map, region_statistics,
)  # fmt: skip
from ultrastyle.core.tiling import Span, Tile
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.runtime.backends.base import Runner, StageNetworks, runner_traits
from ultrastyle.runtime.cascade import style_statistics, stylize_stage
from ultrastyle.runtime.device_fit import DEVICE_FITTER, fit_on_device
from ultrastyle.runtime.memory import available_bytes, disk_free, release_free_memory, trim_heap
from ultrastyle.runtime.tile_io import Pending, TileIO

# (what, done, total) after each tile of a pass ("stage 5 statistics", "stage 5 decode"), and once for a stage that runs
# as one tile ("stage 5 (one tile)", 1, 1): progress moves for images of any size.
TileCallback = Callable[[str, int, int], None]


def mirrored_indices(src: Canvas, rows: Span, cols: Span) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a region of the grid-padded image ``src``: indices past the edge are mirrored in."""
    _, h, w = src.shape
    return (reflect_index(torch.arange(rows.start, rows.stop), h).numpy(),
            reflect_index(torch.arange(cols.start, cols.stop), w).numpy())  # fmt: skip


def _fetch_region(io: TileIO, src: Canvas, t: Tile, ahead: bool) -> Pending:
    """Start reading tile ``t``'s region of the grid-padded image ``src`` through ``io`` (``ahead``: `TileIO.fetch`)."""
    return io.fetch(src, *mirrored_indices(src, t.region_rows, t.region_cols), ahead=ahead)


def _selected(count: int, only: Collection[int] | None) -> list[int]:
    return [i for i in range(count) if only is None or i in only]


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
    only: Collection[int] | None = None,
    overlap: bool = False,
) -> FeatureStats | list[FeatureStats]:
    """Pass 1: content statistics over every tile's core; optionally keep the core features.

    ``keep_bytes``: after each tile the runner may hold at most this much
    memory cached from earlier tiles (`Runner.release_memory`); None: no limit.
    With ``regions``: one `FeatureStats` per region instead. ``only``: the
    indices of the tiles to run, the rest skipped (a cluster worker's share).
    ``overlap``: host canvases read ahead and written behind on worker threads
    (`runtime.tile_io`; the plan's ``options.overlap_io``).
    """
    device, g = model.device, plan.grid
    channels = model.arch.feature_channels(stage)
    total = FeatureStats.empty(channels, device)  # summed where the runner's statistics are (on a GPU: no wait per tile)
    per_region = [FeatureStats.empty(channels, device)] * (0 if regions is None else regions.count)
    tiles = plan.encode_tiles()
    order = _selected(len(tiles), only)
    with TileIO(device, overlap) as io:
        # the next tile's region is read while this one computes
        for i, x in io.read_ahead(order, lambda j, ahead: _fetch_region(io, src, tiles[j], ahead)):
            t = tiles[i]
            ft = t.scaled(g)
            if regions is None:
                part, core = _core_statistics(model, stage, x, *ft.core_in_region, features is not None)
                total = total + part
            else:
                core = model.encode_core(stage, x, *ft.core_in_region)
                labels = regions.feature_labels(g, slice(t.rows.start // g, t.rows.stop // g), slice(t.cols.start // g, t.cols.stop // g))
                per_region = [a + b for a, b in zip(per_region, region_statistics(core, labels, regions.count, host=False))]
            if features is not None:
                io.store(features, ft.rows.start, ft.cols.start, core[0].float())
            _after_tile(model, keep_bytes)
            if on_tile:
                on_tile(f"stage {stage} statistics", i + 1, len(tiles))
    return [s.to_host() for s in per_region] if regions is not None else total.to_host()


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
    only: Collection[int] | None = None,
    overlap: bool = False,
) -> None:
    """Pass 2: (encode ->) A f + b -> decode per tile; write each core, cropped to the image (``keep_bytes``: as pass 1).

    ``regions``: the mask and one map per region, applied to the cached
    ``features`` (required then) before decoding; ``a``, ``b`` are ignored.
    ``only``, ``overlap``: as in `encode_statistics`.
    """
    device, g = model.device, plan.grid
    _, h, w = dst.shape
    tiles = plan.decode_tiles()
    if regions is not None:
        if features is None:
            raise ValueError("mask regions need the stage's features cached between the passes")
        a, b = identity_map(model.arch.feature_channels(stage), device)  # the features arrive transformed
        mask, maps = regions[0], [(ra.to(device), rb.to(device)) for ra, rb in regions[1]]  # copied once, not per tile
    # Backwards: pass 1 ran forwards, so what it touched last, still in the page cache when disk
    # canvases outgrow RAM, is read first; the next stage's pass 1 (forwards) then starts on what
    # this pass wrote last. 100 MP with ~2.2 GiB of page cache: 276 s forwards, 260 s backwards
    # (benchmarks/page_cache.py). Cores partition the image: the order changes no result.
    order = _selected(len(tiles), only)[::-1]

    def fetch(i: int, ahead: bool) -> Pending:  # cached features lie inside the canvas; the image is mirrored in
        t = tiles[i]
        if features is None:
            return _fetch_region(io, src, t, ahead)
        return io.fetch(features, *t.region, ahead=ahead)

    with TileIO(device, overlap) as io:
        for k, (i, x) in enumerate(io.read_ahead(order, fetch)):  # the next tile's region is read while this one computes
            t = tiles[i]
            if features is not None:
                if regions is not None:
                    x = apply_regions(x, mask.feature_labels(g, *t.region), maps)
                rs, cs = t.core_in_region
                y = model.decode_core(stage, x, a, b, slice(rs.start * g, rs.stop * g), slice(cs.start * g, cs.stop * g))
                scale = g
            else:
                y, scale = model.stylize_core(stage, x, a, b, *t.core_in_region), 1
            r0, c0 = t.rows.start * scale, t.cols.start * scale
            if r0 < h and c0 < w:
                io.store(dst, r0, c0, y[0, :, : h - r0, : w - c0].float())
            _after_tile(model, keep_bytes)
            if on_tile:
                on_tile(f"stage {stage} decode", k + 1, len(tiles))


def plan_image_for(
    model: StageNetworks, height: int, width: int, levels: tuple[int, ...], options: TilingOptions, *, masked: bool = False
) -> ImagePlan:
    """`plan_image` for ``model``: its traits (`runner_traits`), its device, the RAM and scratch disk available now."""
    return plan_image(
        model.arch, height, width, levels, options, runner_traits(model), model.device,
        masked=masked, ram_available=available_bytes(), disk_free=disk_free(options.scratch_dir),
    )  # fmt: skip


def stylize_stage_tiled(
    model: StageNetworks,
    src: Canvas,
    style: Style,
    plan: StagePlan,
    *,
    method: str,
    alpha: float,
    site: CanvasSite = CanvasSite(),
    keep_bytes: int | None = None,
    on_tile: TileCallback | None = None,
    out: Canvas | None = None,
    overlap: bool = False,
) -> Canvas:
    """Stage ``plan.stage`` over a whole canvas, tile by tile, into ``out`` or a new canvas at ``site``.

    ``style``: as in `stylize_tiled` (`Regions` need a plan that caches
    features: `plan_image` with ``masked``). ``keep_bytes``: what the runner
    and the heap may keep between tiles (`ImagePlan.keep_bytes`; None: no
    limit, nothing handed back). Every pixel of ``out`` is overwritten, so a
    spare canvas from an earlier stage can be reused: its pages are already
    mapped, which saves the page faults of a fresh one. ``overlap``: as in
    `encode_statistics`.
    """
    c, h, w = src.shape
    stage = plan.stage
    if out is not None and out.shape != src.shape:
        raise ValueError(f"output canvas has shape {out.shape}, the stage's input {src.shape}")
    target = as_style(style)
    regions = target if isinstance(target, Regions) else None
    if plan.one_tile:
        try:
            done = _whole_stage(model, stage, src, target, method, alpha, out, site)
        finally:
            _release(model, keep_bytes)
        if on_tile is not None:
            on_tile(f"stage {stage} (one tile)", 1, 1)
        return done
    if regions is not None and not plan.cache:
        raise ValueError("mask regions need the stage's features cached between the passes: plan the image with masked=True")
    feats = None
    if plan.cache:
        feats = Canvas.at(site, model.arch.feature_channels(stage), plan.height // plan.grid, plan.width // plan.grid, channels_last=True)
    try:
        content = encode_statistics(model, stage, src, plan, feats, on_tile, keep_bytes, regions, overlap=overlap)
        _release(model, keep_bytes)
        if regions is not None:  # decode_tiles applies the per-region maps itself
            maps = regions.fit(method, stage, content, alpha)
            a, b = identity_map(model.arch.feature_channels(stage))
        else:
            assert isinstance(target, Target) and isinstance(content, FeatureStats)
            # PyTorch on a GPU: A and b fitted there once, not copied (and waited for) per tile; engines take host maps.
            if fit_on_device("auto", model.device) and getattr(model, "backend", "torch") == "torch":
                a, b = DEVICE_FITTER.fit(target, method, stage, content, alpha, model.device)
            else:
                a, b = target.fit(method, stage, content, alpha)
        dst = out if out is not None else Canvas.at(site, c, h, w)
        try:
            decode_tiles(
                model, stage, src, dst, plan, a, b, feats, on_tile, keep_bytes, None if regions is None else (regions, maps),
                overlap=overlap,
            )  # fmt: skip
        except BaseException:
            if out is None:
                dst.close()
            raise
    finally:
        if feats is not None:
            feats.close()
        _release(model, keep_bytes)
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
    """Per-stage style statistics by tiled pass 1 (equal to `cascade.style_statistics`).

    A stage whose plan is one tile is the whole-image computation itself
    (`cascade.style_statistics`), as `stylize_stage_tiled` runs such a stage.
    """
    _, h, w = style.shape
    traits = runner_traits(model)
    keep = options.keep_bytes(traits)
    overlap = bool(options.resolve(traits).overlap_io)
    whole = None
    stats = {}
    for plan in plan_stages(model.arch, h, w, levels, options, traits):
        k = plan.stage
        if plan.one_tile:
            if whole is None:
                whole = style.read_tensor(slice(None), slice(None), model.device)
            stats[k] = style_statistics(model, whole, (k,))[k]
        else:
            stats[k] = encode_statistics(model, k, style, plan, overlap=overlap)
        _release(model, keep)
    return stats


def _after_tile(model: StageNetworks, keep_bytes: int | None) -> None:
    """Mid-pass: the runner and the C heap hand back what they keep beyond ``keep_bytes`` (None: nothing).

    The runner by its own rule (an ORT arena fragments over many tiles); the
    heap once the resident set has grown by more than that since its last
    trim (`memory.keep_freed_memory`). Measured at 40 MP, 1 GB budget,
    PyTorch: trimming past half the budget 4.89 s/MP and 1.65 GiB peak, past
    the whole budget 3.55 s/MP and 2.26 GiB (over the 2 GB the budget
    promises); `RunnerTraits.cache_share` sets the share.
    """
    if keep_bytes is None:
        return
    if isinstance(model, Runner):  # a bare StyleModel keeps nothing of its own
        model.release_memory(keep_bytes)
    trim_heap(keep_bytes)


def _release(model: StageNetworks, keep_bytes: int | None) -> None:
    """Between passes: as after a tile, then the C heap's free pages too (None: nothing, as the whole-image cascade)."""
    if keep_bytes is None:
        return
    _after_tile(model, keep_bytes)
    release_free_memory()


def _core_statistics(
    model: StageNetworks, stage: int, x: torch.Tensor, rows: slice, cols: slice, keep: bool
) -> tuple[FeatureStats, torch.Tensor | None]:
    """A runner's pass-1 reduction (`Runner.encode_core_statistics`; a GPU backend reduces on the device)."""
    if isinstance(model, Runner):
        return model.encode_core_statistics(stage, x, rows, cols, keep)
    core = model.encode_core(stage, x, rows, cols)  # a bare StyleModel: what the base Runner does
    return FeatureStats.of(core, host=False), (core if keep else None)


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
    plan: ImagePlan | None = None,
    consume_content: bool = False,
) -> Canvas:
    """The cascade over ``levels`` on a canvas; the caller closes ``content`` and the result (which may be one).

    ``consume_content``: the caller needs ``content`` no more once the first
    stage has read it, so later stages may write into it, or close it where
    it is a scratch file (two canvases alive instead of three: 12 GB less
    scratch at a gigapixel).

    ``style``: per-stage statistics of one style (`style_statistics_tiled`),
    a weighted `Target`, or `Regions` (a mask the content's size).
    ``options`` are resolved once into the image's `ImagePlan`
    (`plan_image_for`), or ``plan`` is that plan already (as `content_canvas`
    used it). ``TilingOptions.unbounded()`` runs the whole-image cascade
    (`runtime.cascade.stylize`), with the same result bit for bit.
    """
    _, h, w = content.shape
    target = as_style(style)
    masked = isinstance(target, Regions)
    if masked:
        target.check_size(h, w)
    if plan is None:
        plan = plan_image_for(model, h, w, levels, options, masked=masked)
    elif (plan.height, plan.width) != (h, w):
        raise ValueError(f"the plan is for a {plan.width}x{plan.height} image, the content is {w}x{h}")
    x, spare = content, None  # stage outputs alternate between two canvases
    try:
        for k in levels:
            if spare is not None and spare.on_disk:
                # A fresh file instead (the old one's space is freed first): a tile's rows end mid-page,
                # and a write into a page of old data that has left the page cache reads it from the
                # disk first, one page at a time. 1 GP: stage 4's pass 2 took 792 s for 10.9 GB read.
                spare.close()
                spare = None
            y = stylize_stage_tiled(
                model, x, target, plan.stage(k), method=method, alpha=alpha,
                site=plan.site, keep_bytes=plan.keep_bytes, on_tile=on_tile, out=spare,
                overlap=bool(plan.options.overlap_io),
            )  # fmt: skip
            spare = x if x is not content or consume_content else None
            x = y
    except BaseException:
        if x is not content:
            x.close()
        raise
    finally:
        if spare is not None and spare is not content:  # the caller closes its content
            spare.close()
    return x


def content_canvas(
    model: StageNetworks,
    pixels: np.ndarray,
    options: TilingOptions,
    levels: tuple[int, ...],
    layout: str = "hwc",
    *,
    plan: ImagePlan | None = None,
) -> Canvas:
    """The content canvas of ``pixels`` where `stylize_tiled` keeps this image's canvases (RAM, disk or the GPU).

    ``plan``: the image's `ImagePlan`, to pass on to `stylize_tiled` (else planned here from ``options``).
    """
    h, w = pixels.shape[:2] if layout == "hwc" else pixels.shape[1:]
    site = (plan or plan_image_for(model, h, w, levels, options)).site
    return canvas_from_array(pixels, layout=layout, disk_dir=site.disk_dir, device=site.device)


def canvas_to_image(canvas: Canvas, dtype: type = np.uint8, band: int = 512) -> np.ndarray:
    """(H, W, 3) uint8/uint16 of a [0, 1] canvas, clamped and rounded, converted band by band."""
    c, h, w = canvas.shape
    peak = sample_peak(dtype)
    out = np.empty((h, w, c), dtype)
    for r in range(0, h, band):
        if r + band < h:
            canvas.prefetch(slice(r + band, r + 2 * band), slice(None))
        # In torch, which uses every core: the same float32 arithmetic, truncated as numpy's astype would.
        blk = torch.from_numpy(canvas.rows_band(r, min(h, r + band))).clamp_(0, 1).mul_(peak).add_(0.5).permute(1, 2, 0)
        if out.dtype == np.uint8:
            torch.from_numpy(out[r : r + band]).copy_(blk)
        else:  # uint16: no torch dtype before 2.3
            out[r : r + band] = blk.numpy().astype(dtype)
    return out
