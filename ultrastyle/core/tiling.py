"""Tile plans: pure functions from an image size to core and halo regions.

Coordinates are in pixels of the grid-padded image (`core.padding`); every
boundary lies on the stage's pooling grid. Cores partition the image (each
output pixel belongs to exactly one core); a tile's region is its core grown
by the halo and clipped to the image, so a border tile starts exactly at the
image border and halos only extend inward.

With ``uniform`` regions a border tile's region is shifted
inward to the interior tiles' size instead of clipped: its core is then
further than the halo from the region's inner edge, which keeps the result
exact, and every tile of a pass has one shape. A runtime that caches memory
per shape (ONNX Runtime's arena) then reuses one allocation instead of
fragmenting over up to nine shapes per pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Half-open interval [start, stop) on one axis."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` (written to the output) inside ``region`` (read and computed)."""

    rows: Span
    cols: Span
    region_rows: Span
    region_cols: Span

    @property
    def region(self) -> tuple[slice, slice]:
        """Slices of the region (what is read), in the tile's own coordinates; no mirroring past the edges."""
        return slice(self.region_rows.start, self.region_rows.stop), slice(self.region_cols.start, self.region_cols.stop)

    @property
    def core_in_region(self) -> tuple[slice, slice]:
        """Slices that cut the core out of the region's result (same resolution)."""
        r0 = self.rows.start - self.region_rows.start
        c0 = self.cols.start - self.region_cols.start
        return slice(r0, r0 + self.rows.size), slice(c0, c0 + self.cols.size)

    def scaled(self, factor: int) -> Tile:
        """The same tile at a resolution ``factor`` times coarser (all bounds divisible)."""
        spans = (self.rows, self.cols, self.region_rows, self.region_cols)
        return Tile(*(Span(s.start // factor, s.stop // factor) for s in spans))


def split_axis(length: int, core: int, halo: int, grid: int, uniform: bool = False) -> list[tuple[Span, Span]]:
    """(core, region) spans covering ``[0, length)``; length, core and halo are multiples of grid.

    ``uniform``: border regions are shifted inward to ``core + 2 * halo``
    (when the axis is that long) instead of clipped, so all regions of a
    multi-tile axis have one size.
    """
    for name, v in (("length", length), ("core", core), ("halo", halo)):
        if v % grid:
            raise ValueError(f"{name}={v} is not a multiple of the grid {grid}")
    if core <= 0:
        raise ValueError(f"core size must be positive, got {core}")
    out = []
    size = min(length, core + 2 * halo)
    for start in range(0, length, core):
        stop = min(start + core, length)
        lo, hi = max(0, start - halo), min(length, stop + halo)
        if uniform and length > core:
            lo = min(lo, length - size)  # last tile: grow leftwards
            hi = max(hi, lo + size)  # first tile: grow rightwards
        out.append((Span(start, stop), Span(lo, hi)))
    return out


def balanced_core(length: int, core: int, grid: int) -> int:
    """The smallest grid-multiple core that covers ``length`` in as many tiles as ``core`` needs.

    1008 px in cores of 1000 becomes two cores of 504 instead of 1000 + an 8 px
    sliver carrying a full halo.
    """
    n = -(-length // core)
    return min(core, -(-(-(-length // n)) // grid) * grid)


def plan_tiles(height: int, width: int, core: int, halo: int, grid: int, uniform: bool = False) -> list[Tile]:
    """Row-major tiles of at most ``core`` x ``core``, balanced so no row or column of tiles is a sliver.

    ``height`` and ``width`` are the padded image size (multiples of ``grid``);
    ``core`` is rounded down to the grid (at least one grid cell) and ``halo``
    up to it. ``uniform``: one region shape per axis (module docstring).
    """
    core = max(grid, core // grid * grid)
    halo = -(-halo // grid) * grid
    rows = split_axis(height, balanced_core(height, core, grid), halo, grid, uniform)
    cols = split_axis(width, balanced_core(width, core, grid), halo, grid, uniform)
    return [Tile(r, c, rr, rc) for r, rr in rows for c, rc in cols]
