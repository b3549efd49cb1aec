"""Tile plans of a whole image: options resolved once against a runner's traits.

`plan_image` turns one image's size, the `TilingOptions` and the runner's
`RunnerTraits` into an `ImagePlan`: where the image's canvases go, what is
left of the memory budget for the tiles, and per stage a `StagePlan` (halos
from the receptive fields, cores from the tile size or the budget, regions
within the runner's largest region). It is a pure function of its inputs:
nothing here reads process state, so the same image plans the same way
whatever ran before. (`runtime.tiled` runs the plans; `check_budget` is the
cheap image-independent check a caller makes before any work.)

``TilingOptions.unbounded()`` (``max_memory=None``) makes every stage one
tile (regions permitting) with the canvases in the runner's memory: the
whole-image reference cascade is that case.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ultrastyle.core.arch import ArchSpec
from ultrastyle.core.canvas import CanvasSite
from ultrastyle.core.padding import padded_size
from ultrastyle.core.receptive import decoder_radius, encoder_radius, round_up, stage_radius
from ultrastyle.core.tile_memory import DEFAULT_BUDGET, core_for_budget, parse_bytes, region_side_for_budget, stage_bytes_per_pixel
from ultrastyle.core.tiling import Tile, plan_tiles
from ultrastyle.core.traits import BUDGET_MEMORIES, RunnerTraits

DEFAULT_MAX_MEMORY = parse_bytes(DEFAULT_BUDGET)
# A device budget (GPU memory) holds an image's canvases while they take at most this share of it,
# leaving the rest to the tiles; host canvases of a device budget take at most this share of free RAM.
DEVICE_CANVAS_SHARE = 0.5
HOST_CANVAS_SHARE = 0.5
# Cache relu{k}_1 features between the passes when re-encoding would cost more
# than this many multiply-adds per cached float (disk or RAM traffic is cheaper).
CACHE_MACS_PER_VALUE = 200
# The same where the scratch canvases are larger than the RAM available (a gigapixel here), so caches
# go through the disk: 8 bytes per value written and read back, ~40 ns at an effective 200 MB/s, against
# re-encoding at ~60 GMAC/s (ONNX Runtime, 2 cores: stage 5 of a 100 MP run). Leaves out stage 2 of
# cd16x (487; 32 GB at 1 GP), keeps stages 3-5 (1838 and up).
DISK_CACHE_MACS_PER_VALUE = 1000
# The same where a GPU computes and the canvases are not in its memory: a cached float is copied out of
# the GPU (PCIe), scattered into RAM, gathered back and copied in again, ~1-2 ns of one host thread and
# the bus per value, against re-encoding at 11.5 TMAC/s (H200, eager fp16: 200.8 GFLOP/MP in 8.7 ms/MP,
# issue #23), ~0.1 ns per 1000 MACs: break-even near 10^4-2*10^4. Estimated, not measured end to end.
# For cd16x (27, 487, 1838, 7708, 45810 per stage) anything between 7708 and 45810 keeps stage 5 alone.
GPU_HOST_CACHE_MACS_PER_VALUE = 20000
# Scratch canvases with their feature caches take at most this share of the scratch disk's free space
# (the rest is for the output and whatever else runs); past it the caches are left out.
DISK_SHARE = 0.85


@dataclass(frozen=True)
class TilingOptions:
    """How to tile: ``tile`` (core side, px) overrides the ``max_memory`` planner; ``max_memory=None``: unbounded."""

    tile: int | None = None
    max_memory: int | None = DEFAULT_MAX_MEMORY  # bytes; None: unbounded (`unbounded`)
    halo: int | None = None  # None: exact (the full receptive field)
    scratch_dir: Path | None = None  # where disk canvases go (default: the system temp folder)
    ram_canvas_limit: int | None = None  # an image whose host canvases need more goes to disk; None: see canvas_site
    cache_features: bool | None = None  # None: decided per stage by encoder cost
    cache_macs_per_value: int = CACHE_MACS_PER_VALUE  # with cache_features None: cache where the encoder costs this much
    uniform_tiles: bool | None = None  # one region shape per pass (`core.tiling`); None: the runner's preference
    # One tile without halo wherever the image's area fits the budget's square region, whatever its
    # shape; off where regions are bounded per side (TensorRT profiles). None: the runner's
    # `RunnerTraits.bounded_regions` (`resolve`); on for `plan_stage` called directly.
    whole_if_area_fits: bool | None = None
    # What max_memory bounds: "host" (this process's RAM: tiles and RAM canvases) or "device" (GPU
    # memory: tiles, and canvases that fit beside them). None: the runner's (`RunnerTraits.budget_memory`).
    budget: str | None = None
    # Tile reads and writes of host canvases on worker threads, overlapped with compute (`runtime.tile_io`).
    # None: the runner's (`RunnerTraits.overlap_io`: on where a GPU computes).
    overlap_io: bool | None = None

    @classmethod
    def unbounded(cls, **options: object) -> TilingOptions:
        """No memory budget: every stage one tile (within the runner's largest region), canvases in the runner's memory.

        The whole-image reference (`runtime.cascade`) is this case.
        """
        return cls(max_memory=None, **options)  # type: ignore[arg-type]

    def resolve(self, traits: RunnerTraits) -> TilingOptions:
        """These options with every None that means "ask the runner" taken from ``traits``."""
        budget = self.budget or traits.budget_memory
        if budget not in BUDGET_MEMORIES:
            raise ValueError(f"budget must be 'host' or 'device', got {budget!r}")
        overlap = traits.overlap_io if self.overlap_io is None else self.overlap_io
        if overlap and not traits.stable_outputs:
            raise ValueError(
                "overlap_io=True writes tiles behind the compute, but this runner reuses its output buffers on its next "
                "call (CUDA-graph replays); leave overlap_io unset or False for it"
            )
        return replace(
            self,
            uniform_tiles=traits.uniform_tiles if self.uniform_tiles is None else self.uniform_tiles,
            whole_if_area_fits=not traits.bounded_regions if self.whole_if_area_fits is None else self.whole_if_area_fits,
            budget=budget,
            overlap_io=overlap,
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
        self,
        spec: ArchSpec,
        height: int,
        width: int,
        levels: tuple[int, ...],
        device: torch.device | None = None,
        ram_available: int | None = None,
    ) -> CanvasSite:
        """Where all canvases of one image go, given the device the runner's tensors live on (resolve ``budget`` first).

        - Unbounded: in the runner's memory: on ``device`` for a device
          budget whose tensors live there, else in RAM (on disk only past
          ``ram_canvas_limit``).
        - A host budget: in RAM while they take at most a quarter of
          ``max_memory`` (or ``ram_canvas_limit``), the tiles getting the rest;
          else on disk.
        - A device budget: on ``device`` while they take at most
          `DEVICE_CANVAS_SHARE` of ``max_memory`` and the runner's tensors
          live there (PyTorch on CUDA; not TensorRT, whose tiles cross as host
          arrays); else in RAM while they take at most ``ram_canvas_limit`` or
          `HOST_CANVAS_SHARE` of ``ram_available`` (the RAM available now,
          `runtime.memory.available_bytes`; None: unknown, as 0); else on disk.
        """
        need = self.canvas_bytes(spec, height, width, levels)
        on_device = self.budget == "device" and device is not None and device.type != "cpu"
        limit: int | None
        if self.max_memory is None:
            if on_device:
                return CanvasSite(device=device)
            limit = self.ram_canvas_limit
        elif self.budget == "device":
            if on_device and need <= self.max_memory * DEVICE_CANVAS_SHARE:
                return CanvasSite(device=device)
            limit = int((ram_available or 0) * HOST_CANVAS_SHARE) if self.ram_canvas_limit is None else self.ram_canvas_limit
        else:
            limit = self.max_memory // 4 if self.ram_canvas_limit is None else self.ram_canvas_limit
        if limit is None or need <= limit:
            return CanvasSite()
        return CanvasSite(disk_dir=str(self.scratch_dir or tempfile.gettempdir()))

    def tile_budget(self, spec: ArchSpec, height: int, width: int, levels: tuple[int, ...], site: CanvasSite) -> int | None:
        """What one image's tiles may use, its canvases at ``site``: canvases in the budget's memory share it."""
        if self.max_memory is None:
            return None
        shares = site.device is not None if self.budget == "device" else site.disk_dir is None
        if self.tile is None and shares:
            return self.max_memory - self.canvas_bytes(spec, height, width, levels)
        return self.max_memory

    def keep_bytes(self, traits: RunnerTraits) -> int | None:
        """What the runner and the heap may keep between tiles before handing it back: the runner's share of the budget.

        None (unbounded): nothing is handed back, as in the whole-image cascade.
        """
        return None if self.max_memory is None else int(self.max_memory * traits.cache_share)

    def caches(self, spec: ArchSpec, stage: int) -> bool:
        """Whether pass 1 keeps the stage's features for pass 2."""
        if self.cache_features is not None:
            return self.cache_features
        return encoder_macs_per_value(spec, stage) >= self.cache_macs_per_value


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

    @property
    def one_tile(self) -> bool:
        """Whether both passes are one tile: the whole-image stage (`runtime.tiled` runs it as such)."""
        return len(self.encode_tiles()) == 1 and len(self.decode_tiles()) == 1


@dataclass(frozen=True)
class StageHalos:
    """A stage's halos: around encoder tiles and whole-stage tiles (image px, on the grid), around decoder tiles (feature px)."""

    grid: int
    enc: int
    full: int
    dec: int

    def pass2(self, cache: bool) -> int:
        """Pass 2's halo in image pixels: the decoder's (features cached) or the whole stage's."""
        return self.dec * self.grid if cache else self.full


def stage_halos(spec: ArchSpec, stage: int, halo: int | None = None) -> StageHalos:
    """The exact halos from the receptive fields; ``halo``: none larger than that (approximate), never more than exact."""
    g = spec.grid(stage)
    enc = round_up(encoder_radius(spec, stage), g)
    full = round_up(stage_radius(spec, stage), g)
    dec = decoder_radius(spec, stage)
    if halo is not None:
        enc, full, dec = min(enc, round_up(halo, g)), min(full, round_up(halo, g)), min(dec, round_up(halo, g) // g)
    return StageHalos(g, enc, full, dec)


def encoder_macs_per_value(spec: ArchSpec, stage: int) -> float:
    """Encoder multiply-adds per image pixel over its feature floats per image pixel."""
    g = spec.grid(stage)
    return spec.macs_per_pixel(stage, "encoder") / (spec.feature_channels(stage) / (g * g))


def stage_cores(spec: ArchSpec, stage: int, options: TilingOptions, memory_factor: float = 1.0) -> tuple[int, int]:
    """(encode, decode) core sides of a full tile: ``options.tile``, else the largest whose region fits the budget.

    Raises ValueError where the budget holds no tile (`core_for_budget`) or is unbounded without a tile.
    """
    g = spec.grid(stage)
    if options.tile is not None:
        core = max(g, options.tile // g * g)
        return core, core
    if options.max_memory is None:
        raise ValueError("an unbounded budget has no largest tile; give a tile size")
    halos = stage_halos(spec, stage, options.halo)
    return (
        core_for_budget(spec, stage, options.max_memory, halos.enc, factor=memory_factor),
        core_for_budget(spec, stage, options.max_memory, halos.pass2(options.caches(spec, stage)), factor=memory_factor),
    )


def plan_stage(
    spec: ArchSpec,
    stage: int,
    height: int,
    width: int,
    options: TilingOptions,
    memory_factor: float = 1.0,
    max_region: int | None = None,
) -> StagePlan:
    """Halos from the receptive fields, cores from ``options`` (tile, memory budget, or unbounded: the whole image).

    ``memory_factor`` is the backend's measured peak over the planner's model
    (`RunnerTraits.memory_factor`); ``max_region`` the largest region side the
    runner accepts (`RunnerTraits.max_region`): where the image is larger,
    cores shrink until every region fits, and a ``tile`` whose regions cannot
    fit raises ValueError saying what fits.
    """
    g = spec.grid(stage)
    halos = stage_halos(spec, stage, options.halo)
    cache = options.caches(spec, stage)
    height, width = padded_size(height, g), padded_size(width, g)
    side = max(height, width)
    if options.tile is not None:
        encode_core, decode_core = stage_cores(spec, stage, options, memory_factor)
    elif options.max_memory is None or (
        options.whole_if_area_fits is not False
        and height * width <= region_side_for_budget(spec, stage, options.max_memory, factor=memory_factor) ** 2
    ):  # the memory is the area's: a 2 MP image, wider than the square, still runs whole
        encode_core = decode_core = side
    else:
        encode_core, decode_core = stage_cores(spec, stage, options, memory_factor)
    if max_region is not None and side > max_region:  # (an image within it: every region is)
        encode_core, decode_core = _fit_region(
            spec, stage, encode_core, decode_core, halos, cache, max_region, options.tile is not None
        )
    return StagePlan(
        stage, g, height, width, halos.enc, halos.full, halos.dec,
        encode_core, decode_core, bool(cache), bool(options.uniform_tiles),
    )  # fmt: skip


def _fit_region(
    spec: ArchSpec, stage: int, encode_core: int, decode_core: int, halos: StageHalos, cache: bool, max_region: int,
    fixed: bool,
) -> tuple[int, int]:
    """Cores no larger than what keeps each pass's regions within ``max_region``; ``fixed`` (a given tile): refuse instead of shrinking."""
    g = spec.grid(stage)
    enc_cap = (max_region - 2 * halos.enc) // g * g
    dec_cap = (max_region - 2 * halos.pass2(cache)) // g * g
    if min(enc_cap, dec_cap) < g:
        need = g + 2 * max(halos.enc, halos.pass2(cache))
        raise ValueError(
            f"stage {stage} of this runner accepts regions of at most {max_region} px (its engines' profiles), too "
            f"small for any tile inside the stage's halos: a {g}-px core needs a {need}-px region; build the "
            f"engines for regions of at least {need} px"
        )
    if fixed and (encode_core > enc_cap or decode_core > dec_cap):
        region = max(encode_core + 2 * halos.enc, decode_core + 2 * halos.pass2(cache))
        raise ValueError(
            f"tiles of {max(encode_core, decode_core)} px make {region}-px regions at stage {stage}, larger than the "
            f"{max_region} px its runner accepts (its engines' profiles); use tiles of at most {min(enc_cap, dec_cap)} "
            f"px, or engines built for {region}-px regions"
        )
    return min(encode_core, enc_cap), min(decode_core, dec_cap)


def plan_stages(
    spec: ArchSpec, height: int, width: int, stages: Iterable[int], options: TilingOptions, traits: RunnerTraits
) -> tuple[StagePlan, ...]:
    """`plan_stage` for each of ``stages`` (ascending), with the options resolved against ``traits``."""
    options = options.resolve(traits)
    return tuple(
        plan_stage(spec, k, height, width, options, traits.memory_factor(k), traits.max_region(k)) for k in sorted(set(stages))
    )


@dataclass(frozen=True)
class ImagePlan:
    """One image's tiling, resolved once: where its canvases go, the tiles' budget, and each stage's tiles."""

    height: int
    width: int
    levels: tuple[int, ...]
    options: TilingOptions  # resolved against the runner's traits; ``max_memory``: what the tiles may use
    site: CanvasSite
    keep_bytes: int | None  # what the runner and the heap may keep between tiles (None: no limit, nothing handed back)
    stages: tuple[StagePlan, ...]  # one per distinct level, ascending

    def stage(self, stage: int) -> StagePlan:
        for p in self.stages:
            if p.stage == stage:
                return p
        raise KeyError(f"stage {stage} is not planned; the plan has {[p.stage for p in self.stages]}")


def plan_image(
    arch: ArchSpec,
    height: int,
    width: int,
    levels: tuple[int, ...],
    options: TilingOptions,
    traits: RunnerTraits,
    device: torch.device | None = None,
    *,
    masked: bool = False,
    ram_available: int | None = None,
    disk_free: int | None = None,
) -> ImagePlan:
    """The `ImagePlan` of stylizing one ``height`` x ``width`` image over ``levels`` (a pure function of its arguments).

    ``device``: where the runner's tensors live (canvases may go there);
    ``masked``: mask regions (`core.styles.Regions`), whose pass 2 transforms
    cached features, so every stage caches them; ``ram_available``: the RAM
    available now, for a device budget's host canvases (`TilingOptions.canvas_site`);
    ``disk_free``: the scratch folder's free bytes (None: unknown). Canvases
    on disk whose feature caches would not fit in `DISK_SHARE` of it are
    planned without caches (pass 2 encodes again), so that a large image
    fills no disk; canvases on disk larger than ``ram_available`` cache only
    the stages whose encoders cost `DISK_CACHE_MACS_PER_VALUE` (their caches
    go through the disk, not the page cache); masks need the caches whatever
    the disk. Where the runner's tensors live on a GPU (PyTorch on CUDA) and
    the canvases do not fit in its memory with every cache, only the stages
    whose encoders cost `GPU_HOST_CACHE_MACS_PER_VALUE` cache (and the canvases
    go on the device if they then fit). Canvases that a host budget would hold
    in RAM go on disk where they would leave the tiles too little (near the
    least budget, `check_budget`'s, which holds the tiles alone).
    """
    options = options.resolve(traits)
    if masked:
        options = replace(options, cache_features=True)
    site = options.canvas_site(arch, height, width, levels, device, ram_available)
    if _gpu_reencodes(traits, device) and site.device is None and options.cache_features is None:
        # A GPU computes and the caches would live off it: it re-encodes rather than ship features
        # over the bus, and the canvases, smaller without those caches, may then fit on it after all.
        # Only where the runner's tensors live on the GPU (PyTorch): TensorRT's engine profiles and
        # `check_budget` are sized with the caches of the CPU rule, and its tiles cross as host arrays.
        options = replace(options, cache_macs_per_value=max(options.cache_macs_per_value, GPU_HOST_CACHE_MACS_PER_VALUE))
        site = options.canvas_site(arch, height, width, levels, device, ram_available)

    def placed(site: CanvasSite) -> tuple[TilingOptions, str | None]:
        """The tiles' options with the canvases at ``site``, and why the caches were left out for lack of disk."""
        placed, short_disk = options, None
        if site.disk_dir is not None and placed.cache_features is None:
            if ram_available is not None and placed.canvas_bytes(arch, height, width, levels) > ram_available:
                placed = replace(placed, cache_macs_per_value=max(placed.cache_macs_per_value, DISK_CACHE_MACS_PER_VALUE))
            if disk_free is not None and placed.canvas_bytes(arch, height, width, levels) > disk_free * DISK_SHARE:
                placed = replace(placed, cache_features=False)
                short_disk = f"the scratch folder {site.disk_dir} has {size_text(disk_free)} free, too little for this image's feature caches"
        if site.disk_dir is not None and disk_free is not None and (need := placed.canvas_bytes(arch, height, width, levels)) > disk_free:
            # before any tile: else the run fails at its first canvas that does not fit, after the work before it
            raise ValueError(f"a {width}x{height} image's canvases need {size_text(need)} on disk and the scratch folder "
                             f"{site.disk_dir} has {size_text(disk_free)} free; free space there or choose another scratch folder")
        return replace(placed, max_memory=placed.tile_budget(arch, height, width, levels, site)), short_disk

    def stages_at(site: CanvasSite) -> tuple[TilingOptions, tuple[StagePlan, ...]]:
        tiles, short_disk = placed(site)
        try:
            return tiles, plan_stages(arch, height, width, levels, tiles, traits)
        except ValueError as exc:  # without caches pass 2 needs wider halos: the disk is the cause, not the budget alone
            if short_disk is not None:
                raise ValueError(f"{short_disk}, and without them {exc}; free space there or choose another scratch folder") from None
            raise

    try:
        tiles, stages = stages_at(site)
    except ValueError:
        in_ram = site.disk_dir is None and site.device is None
        if not (in_ram and options.tile is None and options.max_memory is not None and options.budget != "device"):
            raise
        # Canvases in RAM share a host budget with the tiles; near the least budget (`check_budget`'s figure, which is
        # for tiles alone) they leave too little, and on disk they leave the tiles all of it.
        site = CanvasSite(disk_dir=str(options.scratch_dir or tempfile.gettempdir()))
        tiles, stages = stages_at(site)
    return ImagePlan(height, width, tuple(levels), tiles, site, tiles.keep_bytes(traits), stages)


class BudgetTooSmall(ValueError):
    """A memory budget that holds no tile of some stage; ``need``: the least budget that holds one of every stage, in bytes."""

    def __init__(self, budget: int, stage: int, need: int) -> None:
        super().__init__(f"the memory budget of {size_text(budget)} cannot hold one tile of stage {stage}; at least {size_text(need, up=True)} is needed")
        self.budget, self.stage, self.need = budget, stage, need


def _gpu_reencodes(traits: RunnerTraits, device: torch.device | None) -> bool:
    """Whether the runner's tensors live on a GPU, where `plan_image` may leave cheap feature caches out."""
    return traits.budget_memory == "device" and device is not None and device.type != "cpu"


def check_budget(
    arch: ArchSpec, levels: Iterable[int], options: TilingOptions, traits: RunnerTraits, device: torch.device | None = None
) -> None:
    """Raise ValueError, before any work, where no image could be tiled with ``options`` on this runner.

    ``device``: where the runner's tensors live; on a GPU the stages that may
    re-encode instead of caching (`GPU_HOST_CACHE_MACS_PER_VALUE`) are checked
    with pass 2's wider halo.

    That is where the memory budget cannot hold one tile of some stage (the
    smallest: a core of two grid cells plus the halos), where a given tile
    makes regions larger than the runner accepts, or where the runner's
    largest region leaves no room for a core. Cheap: no image is planned.
    """
    options = options.resolve(traits)
    gpu = _gpu_reencodes(traits, device)
    short: list[int] = []  # stages whose smallest tile the budget cannot hold
    needs: dict[int, float] = {}  # each stage's smallest tile, in bytes
    for k in sorted(set(levels)):
        g = arch.grid(k)
        halos = stage_halos(arch, k, options.halo)
        cache = options.caches(arch, k)
        factor = traits.memory_factor(k)
        if options.tile is None and options.max_memory is not None:
            if gpu and options.cache_features is None:  # canvases off the GPU: this stage may encode again
                cache = cache and encoder_macs_per_value(arch, k) >= GPU_HOST_CACHE_MACS_PER_VALUE
            widest = max(halos.enc, halos.pass2(cache))
            needs[k] = (2 * g + 2 * widest) ** 2 * factor * stage_bytes_per_pixel(arch, k)
            if region_side_for_budget(arch, k, options.max_memory, factor=factor) - 2 * widest < 2 * g:
                short.append(k)
        limit = traits.max_region(k)
        if limit is not None:
            cores = stage_cores(arch, k, options, factor) if options.tile is not None else (g, g)
            _fit_region(arch, k, *cores, halos, cache, limit, options.tile is not None)
    if short and options.max_memory is not None:  # the stage that needs most: one figure that is enough for all
        worst = max(needs, key=lambda k: needs[k])
        raise BudgetTooSmall(options.max_memory, worst, math.ceil(needs[worst]))


# A fixed tile whose regions cost more than this many times its core's own work is worth a word (its halo dominates).
TILE_OVERHEAD_WARN = 16.0


def halo_overhead(core: int, halo: int) -> float:
    """Work of a square tile's region over its core's own: ((core + 2 halo) / core)²."""
    return ((core + 2 * halo) / core) ** 2


def smallest_tile(overhead: Callable[[int], float], step: int) -> int:
    """The smallest tile side (a multiple of ``step``) whose ``overhead(side)`` is at most `TILE_OVERHEAD_WARN`."""
    return next(t for t in range(step, 1 << 20, step) if overhead(t) <= TILE_OVERHEAD_WARN)


class TileWarning(UserWarning):
    """A fixed tile that makes the run hold more than its memory budget, or one so small that its halo dominates the work."""


def fixed_tile_notes(arch: ArchSpec, levels: Iterable[int], options: TilingOptions, traits: RunnerTraits) -> list[str]:
    """What a fixed ``options.tile`` costs that the caller may not expect; [] for an automatic tile.

    A fixed tile overrides the budget's planner (`TilingOptions`): one whose
    regions need more than ``max_memory`` makes the run hold more than its
    budget, and one far below a stage's halo computes each pixel many times
    over (on images larger than the tile). Cheap: no image is planned.
    """
    options = options.resolve(traits)
    if options.tile is None:
        return []
    stages = sorted(set(levels))
    halos = {k: stage_halos(arch, k, options.halo) for k in stages}
    halo = {k: max(halos[k].enc, halos[k].pass2(options.caches(arch, k))) for k in stages}  # the widest pass's, as check_budget

    def core(k: int, tile: int) -> int:
        return max(arch.grid(k), tile // arch.grid(k) * arch.grid(k))

    def overhead(k: int, tile: int) -> float:
        return halo_overhead(core(k, tile), halo[k])

    notes: list[str] = []
    need = {k: (core(k, options.tile) + 2 * halo[k]) ** 2 * traits.memory_factor(k) * stage_bytes_per_pixel(arch, k) for k in stages}
    worst = max(stages, key=lambda k: need[k])
    if options.max_memory is not None and need[worst] > options.max_memory:
        try:
            fits = min(min(stage_cores(arch, k, replace(options, tile=None), traits.memory_factor(k))) for k in stages)
            largest = f"a tile of {fits} px or an automatic one stays within it"
        except ValueError:
            largest = "no tile fits it"
        notes.append(f"tile {options.tile} px makes stage {worst} regions of about {size_text(need[worst], up=True)}, more than the "
                     f"{size_text(options.max_memory)} the memory budget leaves for tiles: on images larger than the tile the run holds "
                     f"more than its budget; {largest}")  # fmt: skip
    slow = max(stages, key=lambda k: overhead(k, options.tile))
    if overhead(slow, options.tile) > TILE_OVERHEAD_WARN:
        enough = smallest_tile(lambda t: max(overhead(k, t) for k in stages), 64)
        notes.append(f"tile {options.tile} px is small beside stage {slow}'s halo of {halo[slow]} px: on images larger than the tile "
                     f"each pixel is computed about {overhead(slow, options.tile):.0f} times over; a tile of {enough} px or more "
                     f"keeps that under {TILE_OVERHEAD_WARN:.0f}")  # fmt: skip
    return notes


def size_text(n: float, up: bool = False) -> str:
    """Bytes in GiB to 0.01 (whole MiB below one GiB, whole KiB below one MiB); ``up``: rounded up, so that "at least" holds."""
    if n >= 2**30:
        v = n / 2**30 * 100
        return f"{(math.ceil(v) if up else round(v)) / 100:g} GiB"
    if n < 2**20:  # a budget of 1KB is not "0 MiB"
        return f"{math.ceil(n / 2**10) if up else round(n / 2**10)} KiB" if n >= 2**10 else f"{math.ceil(n)} bytes"
    v = n / 2**20
    return f"{math.ceil(v) if up else round(v)} MiB"
