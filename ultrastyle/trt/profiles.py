"""Optimisation profiles from the tile shapes the planner uses.

A TensorRT engine with dynamic shapes runs any input between its profile's
``min`` and ``max`` and is tuned for ``opt``. Every tile the tiled pipeline
sends to a stage network is a *region*: a core plus halos, clipped to the
grid-padded image (`core.plan.plan_stage`). So, per stage k with grid g:

- ``min`` = 2g: the smallest padded image side (`core.padding.padded_size`),
  a 1-pixel strip padded up; it also keeps every reflect pad legal (the
  deepest feature map is 2 pixels wide, a pad of 1 mirrors inside it);
- ``max`` = the largest region the planner makes for the memory budget
  (pass 1: core + 2 encoder halos; pass 2: core + 2 decoder or full halos);
- ``opt`` = ``max``: on a large image nearly every tile is a full one.

Sides are image pixels and multiples of g; decoders and the statistics graph
see the same region at 1/g (feature pixels). One profile per engine, square
bounds (a region is at most ``max`` on each side, so tall and wide tiles are
inside it too). A budget that would plan larger regions than an engine's
``max`` is met by smaller tiles, never by running outside the profile: the
runner's traits carry each stage's profile max (`RunnerTraits.max_region`),
and the planner keeps every region within it (`core.plan.plan_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ultrastyle.core.arch import ArchSpec
from ultrastyle.core.plan import DEFAULT_MAX_MEMORY, StagePlan, TilingOptions, stage_cores, stage_halos
from ultrastyle.core.receptive import round_up
from ultrastyle.errors import Setting, remedied
from ultrastyle.trt.memory_model import memory_factor

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TileRange:
    """Region sides in image pixels: the optimisation profile of one stage's engines."""

    min: int
    opt: int
    max: int

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def stage_range(spec: ArchSpec, stage: int, requested: TileRange) -> TileRange:
    """``requested`` on stage k's grid: min rounded up (at least 2g), opt and max rounded down (at least min)."""
    g = spec.grid(stage)
    lo = max(2 * g, round_up(requested.min, g))
    hi = max(lo, requested.max // g * g)
    opt = min(hi, max(lo, requested.opt // g * g))
    return TileRange(lo, opt, hi)


def region_for_core(spec: ArchSpec, stage: int, core: int, options: TilingOptions) -> int:
    """The largest region side (image px) any pass of ``stage`` makes for tiles with this core."""
    halos = stage_halos(spec, stage, options.halo)
    return core + 2 * max(halos.enc, halos.pass2(options.caches(spec, stage)))


def max_core_for_profile(spec: ArchSpec, stage: int, max_region: int, options: TilingOptions) -> int:
    """The largest core (multiple of g) whose regions fit ``max_region``; 0 when even one grid cell does not."""
    g = spec.grid(stage)
    halo_span = region_for_core(spec, stage, 0, options)
    return max(0, (max_region - halo_span) // g * g)


def default_ranges(
    spec: ArchSpec,
    stages: tuple[int, ...],
    precision: str = "fp32",
    max_memory: int = DEFAULT_MAX_MEMORY,
    options: TilingOptions | None = None,
) -> dict[int, TileRange]:
    """Per stage: min 2g, opt = max = the largest region the planner makes within ``max_memory`` on TensorRT.

    That is the region of a full tile (`core.plan.stage_cores`: the budget's, or ``options.tile``) in
    whichever pass has the wider halo: every tile of any image is at most that.
    """
    options = replace(options or TilingOptions(), max_memory=max_memory)
    out = {}
    for k in stages:
        g = spec.grid(k)
        halos = stage_halos(spec, k, options.halo)
        encode_core, decode_core = stage_cores(spec, k, options, memory_factor(spec, k, precision))
        biggest = round_up(max(encode_core + 2 * halos.enc, decode_core + 2 * halos.pass2(options.caches(spec, k))), g)
        out[k] = TileRange(2 * g, biggest, biggest)
    return out


def requested_ranges(
    spec: ArchSpec, stages: tuple[int, ...], *, tile_min: int | None, tile_opt: int | None, tile_max: int | None,
    precision: str = "fp32",
) -> dict[int, TileRange]:
    """``tile_min``/``tile_opt``/``tile_max`` (px; None: the planner's default) over the planner's defaults, each stage on its own grid.

    ValueError where the sides given are out of order (min <= opt <= max); its ``.remedy`` holds the two settings (`errors.Setting`).
    """
    given = [(n, v) for n, v in (("tile_min", tile_min), ("tile_opt", tile_opt), ("tile_max", tile_max)) if v is not None]
    for (a, x), (b, y) in zip(given, given[1:]):
        if x > y:
            named = (Setting(a, int(x)), Setting(b, int(y)))
            raise remedied(ValueError(f"{named[0].python()} is above {named[1].python()}; give the tile sides in order, min <= opt <= max"), named)
    defaults = default_ranges(spec, stages, precision)
    out = {}
    for k in stages:
        d = defaults[k]
        # A side given above the default max raises it (as tile_max raises opt): a given side is never clipped unsaid.
        hi = tile_max if tile_max is not None else max(d.max, tile_opt or 0, tile_min or 0)
        opt = tile_opt if tile_opt is not None else (hi if tile_max is not None else d.opt)
        out[k] = stage_range(spec, k, TileRange(tile_min if tile_min is not None else d.min, opt, hi))
    return out


def network_shapes(kind: str, stage: int, spec: ArchSpec, rng: TileRange) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Input name -> (min, opt, max) shapes of one engine's profile."""
    g = spec.grid(stage)
    c = spec.feature_channels(stage)
    sides = (rng.min, rng.opt, rng.max)
    if kind == "encoder":
        return {"image": tuple((1, 3, s, s) for s in sides)}  # type: ignore[return-value]
    feats = tuple((1, c, s // g, s // g) for s in sides)
    if kind == "decoder":
        return {"features": feats}  # type: ignore[dict-item]
    if kind == "decoder_affine":
        return {"features": feats, "A": ((c, c),) * 3, "b": ((c,),) * 3}  # type: ignore[dict-item]
    if kind == "stats":
        return {"features": feats, "row_mask": tuple((s // g,) for s in sides), "col_mask": tuple((s // g,) for s in sides)}  # type: ignore[dict-item]
    raise ValueError(f"no profile for network kind {kind!r}; expected encoder, decoder, decoder_affine or stats")


# The keywords `profile_problems` names (`errors.Setting`), for a front end to show its way.
PROFILE_SETTINGS = (Setting("tile_min"), Setting("tile_max"))


def profile_problems(spec: ArchSpec, stage: int, rng: TileRange, options: TilingOptions | None = None) -> list[str]:
    """Why ``rng`` cannot serve stage k's tiles (empty when it can); the fixes name `PROFILE_SETTINGS`."""
    g = spec.grid(stage)
    problems = []
    for name, v in rng.as_dict().items():
        if v % g:
            problems.append(f"stage {stage}: profile {name} {v} px is not a multiple of the stage's grid {g}")
    if rng.min < 2 * g:
        problems.append(
            f"stage {stage}: profile min {rng.min} px is below 2 x grid = {2 * g} px, the smallest padded image side "
            f"(and the smallest on which every reflect pad has 2 pixels to mirror); raise the smallest tile side (tile_min) to {2 * g} or more"
        )
    if not rng.min <= rng.opt <= rng.max:
        problems.append(f"stage {stage}: profile must satisfy min <= opt <= max, got {rng.min} / {rng.opt} / {rng.max}")
    options = options or TilingOptions()
    if max_core_for_profile(spec, stage, rng.max, options) < g:
        need = region_for_core(spec, stage, g, options)
        problems.append(
            f"stage {stage}: profile max {rng.max} px leaves no room for a tile core inside the stage's halos "
            f"(a {g}-px core needs a {need}-px region); raise the largest tile side (tile_max) to at least {need}"
        )
    return problems


def plan_region(plan: StagePlan) -> int:
    """The largest region side (image px) a stage plan makes in either pass."""
    g = plan.grid
    pass2 = plan.decode_core + 2 * (plan.dec_halo * g if plan.cache else plan.full_halo)
    return max(plan.encode_core + 2 * plan.enc_halo, pass2)
