"""Optimization-based stylization end to end: scales, initialisation, budget, resumable state, output.

    import ultrastyle
    out = ultrastyle.optimize("photo.jpg", "art.jpg", iterations=100, max_memory="1GB")   # (H, W, 3) uint8
    with ultrastyle.Optimizer("cd-wct-16x") as o:                                             # one model, many images
        o.run("a.jpg", "art.jpg", output="a_opt.png", state_dir=".a.state", save_every=10)

Per scale (coarse to fine, each long side in ``scales``; 0 is the content's
own size), the content is resized, the style's Grams and the content's
features are computed, the image is initialised (first scale: the content,
noise or ultrastyle's feed-forward result (``init`` "wct": the model's method, AdaIN for an AdaIN model); later scales: the previous result
upsampled) and ``iterations`` solver steps run. Canvases sit in RAM or on disk
as the memory budget says; tiles get what is left (`plan_memory`).

With a ``state_dir`` the run saves its state there every ``save_every``
iterations and at the end of every scale (atomically: a folder swapped in
whole), resumes from it when it matches this run's inputs and settings, and
removes it once the output is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from typing_extensions import Unpack  # typing's own from Python 3.11
import torch

from ultrastyle import options as check
from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array
from ultrastyle.core.padding import padded_size
from ultrastyle.core.plan import TILE_OVERHEAD_WARN, TileWarning, halo_overhead, size_text, smallest_tile
from ultrastyle.core.resample import resized_size
from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.io.atomic import atomic_dir, remove_tree, sweep_stale
from ultrastyle.io.images import DEFAULT_MAX_PIXELS, ImageError, array_to_tensor, as_role, resize_long_side
from ultrastyle.io.metadata import METADATA
from ultrastyle.io.sources import ImageLike, as_source, read_source
from ultrastyle.models.pretrained import DEFAULT_MODEL, load_model
from ultrastyle.runtime.backends.torch_backend import ieee_fp32
from ultrastyle.core.arch import ARCHS
import ultrastyle.optimization.vectors as vec
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.optimization.constants import DEFAULT_ITERATIONS, DEFAULT_MAX_MEMORY, DEFAULT_SAVE_EVERY, DEFAULT_SOLVER, FORMATS, SOLVERS
from ultrastyle.optimization.loss import (
    DEFAULT_CONTENT_LAYER, DEFAULT_CONTENT_WEIGHT, DEFAULT_STYLE_WEIGHT, TAPS, GradientPlan, LossNetwork, LossValue,
    LossWeights, StyleTarget, TileCallback, evaluate, loss_and_gradient, plan_gradient, style_target,
)  # fmt: skip
from ultrastyle.optimization.solvers import (
    DEFAULT_ADAM_LR, DEFAULT_HISTORY, Solver, make_solver, vectors_per_image,
)  # fmt: skip
from ultrastyle.options import OptionError


INITS = ("content", "noise", "wct")
# The optimize calls' own keyword arguments, for "did you mean" (a typo of them lands among the settings).
CALL_KEYWORDS = ("content", "contents", "style", "output", "state_dir", "on_progress", "on_tile", "on_result", "model", "device", "dtype",
                 "threads", "progress", "skip_existing", "shard")  # fmt: skip
STATE_VERSION = 1
# Pass 2 (forward and backward through the 16x encoder) per pixel of a tile's region, measured
# here at 1024 px with a heap trim after each tile: 933 B/px with glibc's defaults, 1129 B/px with
# the command line's heap that keeps freed memory (`runtime.memory.keep_freed_memory`); wider
# encoders scale it by their activations (`_activation_values`).
BYTES_PER_REGION_PIXEL = 1200


@dataclass(frozen=True)
class OptimizeOptions:
    """Every setting of an optimization run (`make_optimize_options` validates them)."""

    iterations: int = DEFAULT_ITERATIONS  # per scale
    scales: tuple[int, ...] = (0,)  # long sides, coarse to fine; 0: the content's size
    init: str = "content"
    solver: str = DEFAULT_SOLVER
    content_weight: float = DEFAULT_CONTENT_WEIGHT
    style_weight: float = DEFAULT_STYLE_WEIGHT
    layer_weights: tuple[tuple[str, float], ...] | None = None
    content_layer: str = DEFAULT_CONTENT_LAYER
    content_size: int = 0
    style_size: int | None = None  # None: the scale's long side, at most the style's own; 0: the style's own size
    max_memory: int | None = parse_bytes(DEFAULT_MAX_MEMORY)
    tile: int | None = None
    scratch: str | None = None
    save_every: int = DEFAULT_SAVE_EVERY
    seed: int = 0
    history: int = DEFAULT_HISTORY
    lr: float = DEFAULT_ADAM_LR
    max_pixels: int = DEFAULT_MAX_PIXELS
    format: str = "png"
    metadata: str = "keep"  # what the output keeps of the content file's (`io.metadata.METADATA`)

    @property
    def weights(self) -> LossWeights:
        lw = dict(self.layer_weights) if self.layer_weights is not None else None
        return LossWeights(self.content_weight, self.style_weight, lw, self.content_layer)

    def trajectory(self) -> dict:
        """The settings a saved state must match to be resumed (not the budget, tiles or saving: results equal; nor what this
        run's init and solver do not read: the seed is noise's, the history L-BFGS's, lr Adam's)."""
        d = asdict(self)
        for k in ("max_memory", "tile", "scratch", "save_every", "max_pixels", "format", "metadata"):
            d.pop(k)
        if self.init != "noise":
            d.pop("seed")
        d.pop("lr" if self.solver == "lbfgs" else "history")
        return d


def _scales(value: Sequence[int | str] | str | int | None) -> tuple[int, ...]:
    if value is None:
        return (0,)
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value) if not isinstance(value, int) else [value]
    out = []
    for item in items:
        if item in ("full", "0", 0):
            out.append(0)
            continue
        try:
            n = int(item)
            if isinstance(item, float) and not item.is_integer():  # int(48.7) is 48: a scale is a whole number of pixels
                raise ValueError
        except (TypeError, ValueError):
            raise OptionError("scales", f"expected long sides in pixels or 'full', e.g. 512,1024,full; got {item!r}") from None
        if n < 32:
            raise OptionError("scales", f"a scale must be at least 32 px, got {n}")
        out.append(n)
    if not out:
        raise OptionError("scales", "give at least one scale")
    body = [s for s in out if s]
    if body != sorted(body) or (0 in out and out.index(0) != len(out) - 1):
        raise OptionError("scales", f"scales go coarse to fine, 'full' last; got {value!r}")
    return tuple(out)


class OptimizeSettings(TypedDict, total=False):
    """The keywords of `make_optimize_options`, which the optimize calls take as ``**settings`` (typed for editors)."""

    iterations: int
    scales: Sequence[int | str] | str | int | None
    init: str
    solver: str
    content_weight: float
    style_weight: float
    layer_weights: Mapping[str, float] | Sequence[float] | None
    content_layer: str
    content_size: int
    style_size: int | None
    max_memory: int | str | None
    tile: int | str | None
    scratch: str | os.PathLike | None
    save_every: int
    seed: int
    history: int
    lr: float
    max_pixels: int
    format: str
    metadata: str


def make_optimize_options(
    *,
    iterations: int = DEFAULT_ITERATIONS,
    scales: Sequence[int | str] | str | int | None = None,
    init: str = "content",
    solver: str = DEFAULT_SOLVER,
    content_weight: float = DEFAULT_CONTENT_WEIGHT,
    style_weight: float = DEFAULT_STYLE_WEIGHT,
    layer_weights: Mapping[str, float] | Sequence[float] | None = None,
    content_layer: str = DEFAULT_CONTENT_LAYER,
    content_size: int = 0,
    style_size: int | None = None,
    max_memory: int | str | None = DEFAULT_MAX_MEMORY,
    tile: int | str | None = None,
    scratch: str | os.PathLike | None = None,
    save_every: int = DEFAULT_SAVE_EVERY,
    seed: int = 0,
    history: int = DEFAULT_HISTORY,
    lr: float = DEFAULT_ADAM_LR,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    format: str = "png",  # noqa: A002 - the name users know from --format
    metadata: str = "keep",
) -> OptimizeOptions:
    """Validated `OptimizeOptions`; raises `OptionError` naming the keyword.

    ``scales``: long sides coarse to fine (``"512,1024,full"``; 0 or "full":
    the content's size). ``layer_weights``: λ per tap, a mapping
    ``{"relu3_1": 2.0, ...}`` (taps left out weigh 0) or five numbers for
    relu1_1..relu5_1; None: 1 each. ``max_memory``: bytes or ``"1GB"``; None:
    the whole image at once. ``tile``: a fixed tile core side instead (None or
    ``"auto"``: fitted to the budget). ``content_size``: the content's long
    side, 0 keeping its size; ``style_size``: the style's, 0 keeping its own
    size, None each scale's long side (at most the style's own). ``metadata``: as `api.make_options`. The keywords
    `api.make_options` takes too are checked by the same `ultrastyle.options`
    rules there and here.
    """
    iterations = check.count("iterations", iterations, what="iterations per scale")
    init = check.choice("init", init, INITS)
    solver = check.choice("solver", solver, SOLVERS)
    content_layer = check.choice("content_layer", content_layer, TAPS)
    content_weight = check.number("content_weight", content_weight, least=0)
    style_weight = check.number("style_weight", style_weight, least=0, example=1e4)
    if content_weight == 0 and style_weight == 0:
        raise remedied(OptionError("style_weight", "content_weight=0 and style_weight=0: the loss would be 0 and the image would not change"),
                       (Setting("content_weight", 0), Setting("style_weight", 0)))  # fmt: skip
    lw = None
    if isinstance(layer_weights, str):  # as the command line writes them: "1,1,1,1,1"
        layer_weights = [item.strip() for item in layer_weights.split(",")]
        try:
            layer_weights = [float(item) for item in layer_weights]
        except ValueError:
            raise OptionError("layer_weights", f"expected {len(TAPS)} numbers (relu1_1..relu5_1), got {','.join(layer_weights)!r}") from None
    if layer_weights is not None:
        items = list(layer_weights.items()) if isinstance(layer_weights, Mapping) else list(zip(TAPS, layer_weights))
        if not isinstance(layer_weights, Mapping) and len(list(layer_weights)) != len(TAPS):
            raise OptionError("layer_weights", f"expected {len(TAPS)} numbers (relu1_1..relu5_1), got {list(layer_weights)}")
        for k, _ in items:
            if k not in TAPS:
                raise OptionError("layer_weights", f"expected taps among {', '.join(TAPS)}, got {k!r}")
        lw = tuple((str(k), check.number("layer_weights", v, least=0)) for k, v in items)
        if content_weight == 0 and not any(v for _, v in lw):
            raise OptionError("layer_weights", "all 0 with content_weight=0: the loss would be 0 and the image would not change")
    content_size = check.image_size("content_size", content_size)
    style_size = check.image_size("style_size", style_size, none="each scale's long side, at most the style's own")
    budget = check.memory_budget("max_memory", max_memory)
    tile = check.tile_side("tile", tile)
    save_every = check.count("save_every", save_every, what="iterations between saves")
    history = check.count("history", history, least=1, what="L-BFGS pairs")
    lr = check.number("lr", lr, above=0, example=DEFAULT_ADAM_LR)
    seed = check.count("seed", seed)
    max_pixels = check.pixel_limit("max_pixels", max_pixels)
    fmt = check.format_choice("format", format, FORMATS)
    return OptimizeOptions(
        iterations=int(iterations), scales=_scales(scales), init=init, solver=solver,
        content_weight=float(content_weight), style_weight=float(style_weight), layer_weights=lw,
        content_layer=content_layer, content_size=content_size, style_size=style_size, max_memory=budget,
        tile=tile, scratch=None if scratch is None else str(check.scratch_folder("scratch", scratch)), save_every=save_every, seed=int(seed),
        history=history, lr=float(lr), max_pixels=max_pixels, format=fmt, metadata=check.choice("metadata", metadata, METADATA),
    )  # fmt: skip


_SETTINGS = frozenset(inspect.signature(make_optimize_options).parameters)
_MODEL_KEYS = ("model", "device", "dtype", "threads", "progress")  # the Optimizer's, not a run's


@dataclass(frozen=True)
class MemoryPlan:
    """Where one scale's canvases go and the tiles' core side."""

    site: CanvasSite
    core: int | None  # None: the whole image as one tile
    canvas_bytes: int


def _activation_values(layers: list) -> float:
    """Floats per input pixel summed over an encoder's layer outputs (what autograd keeps, roughly)."""
    total, area = 3.0, 1.0
    for layer in layers:
        if layer.kind == "pool":
            area /= 4
        else:
            total += layer.cout * area
    return total


def plan_memory(
    net: LossNetwork, height: int, width: int, opts: OptimizeOptions, content_channels: int, *, beside: int | None = None
) -> MemoryPlan:
    """Canvases (content, content features, the solver's vectors) in RAM while they take at most a quarter of the budget, else on disk; tiles get the rest.

    ``beside``: the plan of the style's pass instead (``height`` x ``width``: the
    style), whose style canvas is in RAM beside ``beside`` bytes of the
    content's canvases in RAM; the tiles get what is left.
    Raises `OptionError` (``max_memory``) when no tile fits.
    """
    hp, wp = padded_size(height, net.grid), padded_size(width, net.grid)
    s = net.scale(opts.content_layer)
    if beside is not None:  # the style canvas alone
        need = 3 * height * width * 4
    else:
        need = (vectors_per_image(opts.solver, opts.history) + 1) * 3 * height * width * 4 + content_channels * (hp // s) * (wp // s) * 4
    if opts.max_memory is None:
        return MemoryPlan(CanvasSite(), opts.tile, need)
    on_disk = need > opts.max_memory // 4 and beside is None
    least = least_tile_bytes(net)
    if not on_disk and beside is None and opts.tile is None and opts.max_memory - need < least <= opts.max_memory:
        on_disk = True  # canvases in RAM would leave no tile; on disk they leave the whole budget to tiles
    site = CanvasSite(opts.scratch or _tempdir()) if on_disk else CanvasSite()
    if opts.tile is not None:
        return MemoryPlan(site, opts.tile, need)
    tiles = opts.max_memory - (0 if on_disk else need) - (beside or 0)
    side = int(math.sqrt(max(tiles, 0) / _bytes_per_region_pixel(net))) // net.grid * net.grid
    if side * side >= hp * wp and side >= max(hp, wp) // 2:  # the whole image fits: one tile, no halo
        return MemoryPlan(site, None, need)
    core = side - 2 * net.halo
    if core < 2 * net.grid:
        # The least budget that works: the content's canvases go to disk where RAM would leave no tile (above); the style's
        # pass keeps its canvas and the content's in RAM.
        total = least + (need + beside if beside is not None else 0)
        raise OptionError("max_memory", f"{size_text(opts.max_memory)} is too small for one tile of the loss network on this "
                                        f"image; give at least {size_text(total, up=True)}")  # fmt: skip
    return MemoryPlan(site, core, need)


def _bytes_per_region_pixel(net: LossNetwork) -> float:
    """BYTES_PER_REGION_PIXEL (measured on CD 16x's stage-5 encoder) scaled by this network's activations."""
    return BYTES_PER_REGION_PIXEL * _activation_values(net.layers) / _activation_values(ARCHS["cd16x"].encoder_layers(5))


def least_tile_bytes(net: LossNetwork) -> int:
    """Bytes of the smallest tile the loss network takes (a core of 2 grid cells inside its halo).

    One pixel's bytes more than that region's: `plan_memory` takes a square root of the budget, and its rounding must not
    lose the last row of the region.
    """
    side = 2 * net.grid + 2 * net.halo
    return math.ceil((side * side + 1) * _bytes_per_region_pixel(net))


def tile_notes(net: LossNetwork, opts: OptimizeOptions) -> list[str]:
    """What a fixed ``opts.tile`` costs that the caller may not expect, as `core.plan.fixed_tile_notes` says it for stylize; [].

    Regions above the whole budget make the run hold more than it; a core far below the halo computes each pixel many
    times over (on images larger than the tile).
    """
    if opts.tile is None:
        return []
    g, halo = net.grid, net.halo

    def side(tile: int) -> int:  # the core `plan_gradient` makes of it
        return max(g, tile // g * g)

    def overhead(tile: int) -> float:
        return halo_overhead(side(tile), halo)

    notes: list[str] = []
    region = math.ceil((side(opts.tile) + 2 * halo) ** 2 * _bytes_per_region_pixel(net))
    if opts.max_memory is not None and region > opts.max_memory:
        notes.append(f"tile {opts.tile} px makes regions of about {size_text(region, up=True)}, more than the {size_text(opts.max_memory)} "
                     "memory budget: on images larger than the tile the run holds more than its budget; an automatic tile stays "
                     "within it")  # fmt: skip
    if overhead(opts.tile) > TILE_OVERHEAD_WARN:
        enough = smallest_tile(overhead, g)
        notes.append(f"tile {opts.tile} px is small beside the loss network's halo of {halo} px: on images larger than the tile each "
                     f"pixel is computed about {overhead(opts.tile):.0f} times over; a tile of {enough} px or more keeps that under "
                     f"{TILE_OVERHEAD_WARN:.0f}")  # fmt: skip
    return notes


def _tempdir() -> str:
    import tempfile

    return tempfile.gettempdir()


@dataclass
class ProgressEvent:
    """One finished iteration: where (scale of scales, iteration of iterations), the loss, seconds so far."""

    scale: int
    scales: int
    size: tuple[int, int]  # (H, W) of this scale
    iteration: int
    iterations: int
    value: LossValue
    seconds: float
    tiles: int


ProgressCallback = Callable[[ProgressEvent], None]


class _Objective:
    """The loss of one scale as the solvers see it."""

    def __init__(self, net: LossNetwork, target: StyleTarget, weights: LossWeights, plan: GradientPlan, on_tile: TileCallback | None) -> None:
        self.net, self.target, self.weights, self.plan, self.on_tile = net, target, weights, plan, on_tile

    def value(self, x: Canvas) -> LossValue:
        return evaluate(self.net, x, self.target, self.weights, self.plan, self.on_tile)

    def gradient(self, x: Canvas, g: Canvas, known: LossValue | None = None) -> LossValue:
        return loss_and_gradient(self.net, x, self.target, self.weights, self.plan, g, known=known, on_tile=self.on_tile)


def _source_key(src: Any) -> str:
    if isinstance(src, Path):
        st = src.stat()
        return f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return str(getattr(src, "key", ""))


def read_input(image: ImageLike, role: str, max_pixels: int) -> tuple[Any, torch.Tensor]:
    """(source, (3, H, W) float32 in [0, 1]); `ImageError` naming the file."""
    src = as_source(image, role)
    try:
        return src, array_to_tensor(read_source(src, max_pixels))
    except ImageError as exc:
        if role == "style":  # "style photo.jpg: cannot read ...", as `stylize` says it
            raise as_role("style", exc) from None
        raise


def scale_sizes(height: int, width: int, scales: tuple[int, ...]) -> list[tuple[int, int]]:
    """(H, W) per scale, coarse to fine: long side as given (never above the content's), 0 the content's size; repeats dropped."""
    long = max(height, width)
    out: list[tuple[int, int]] = []
    for s in scales:
        if s == 0 or s >= long:
            size = (height, width)
        else:
            f = s / long
            size = (max(1, round(height * f)), max(1, round(width * f)))
        if size not in out:
            out.append(size)
    return out


def upsample(src: Canvas, dst: Canvas, band: int = 256) -> None:
    """Bilinear resize (align_corners=False, as `F.interpolate`) of ``src`` into ``dst``, band by band."""
    _, hs, ws = src.shape
    _, hd, wd = dst.shape

    def coords(n_dst: int, n_src: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = ((torch.arange(lo, hi, dtype=torch.float64) + 0.5) * (n_src / n_dst) - 0.5).clamp(min=0)
        y0 = y.floor().long().clamp(max=n_src - 1)
        return y0, (y0 + 1).clamp(max=n_src - 1), (y - y0).clamp(0, 1)

    x0, x1, wx = coords(wd, ws, 0, wd)
    for r in range(0, hd, band):
        y0, y1, wy = coords(hd, hs, r, min(hd, r + band))
        lo, hi = int(y0.min()), int(y1.max()) + 1
        rows = torch.from_numpy(src.read(slice(lo, hi), slice(None))).double()
        a, b = rows[:, y0 - lo], rows[:, y1 - lo]
        v = a + (b - a) * wy[None, :, None]
        out = v[:, :, x0] + (v[:, :, x1] - v[:, :, x0]) * wx
        dst.write(r, 0, out.float().numpy())


def _noise(dst: Canvas, seed: int, band: int = 256) -> None:
    c, h, w = dst.shape
    for i, r in enumerate(range(0, h, band)):
        rng = np.random.default_rng([seed, i])  # per band: the same image in RAM or on disk
        dst.write(r, 0, rng.random((c, min(band, h - r), w), dtype=np.float32))


class StateWarning(UserWarning):
    """A saved optimization state that is not resumed (made with other inputs or settings, or damaged: the run starts
    over), or one that cannot be saved (the run goes on without saving)."""


class _StartOver(Exception):
    """The saved state could not be read: removed, and the run starts again from its init."""


class Optimizer:
    """The loss network of ``model`` on ``device``, for many optimization runs.

    ``model``: a zoo name or a folder of CD weights (its deepest encoder is the
    loss network: CD 16x ``5SE`` gives relu1_1..relu5_1), or an `Encoder`
    (e.g. a VGG-19 from `models.convert`). ``dtype``: torch.float32 (default)
    or torch.float64 for the networks. ``threads``: PyTorch's CPU threads
    while a run runs (0: PyTorch's default).
    """

    def __init__(self, model: Any = DEFAULT_MODEL, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 threads: int = 0, progress: bool = True) -> None:  # fmt: skip
        from ultrastyle.models.networks import Encoder
        from ultrastyle.runtime.backends.select import require_torch_device

        self.model = model = check.model_path(model)
        self.threads = check.thread_count("threads", threads)
        device = check.device("device", str(device) if isinstance(device, torch.device) else device)  # "CPU" too, as the CLI takes it
        require_torch_device(device)
        if dtype not in (torch.float32, torch.float64):
            raise OptionError("dtype", f"expected torch.float32 or torch.float64, got {dtype!r}")
        if isinstance(model, Encoder):
            encoder = model
        else:
            loaded = load_model(model, device=device, progress=progress)
            encoder = loaded.encoders[max(loaded.encoders)]
        self.net = LossNetwork(encoder.to(device=device, dtype=dtype))
        self.device = torch.device(device)
        self._checked: set[tuple] = set()

    def close(self) -> None:
        pass

    def check(self, opts: OptimizeOptions) -> None:
        """OptionError where ``opts`` weighs a layer this loss network lacks (a model whose encoder stops earlier).

        Default layer weights (None) cover the layers it has; the rest are left out with a warning. A fixed tile that
        costs more than expected is a `TileWarning` (`tile_notes`). Once per setting: a batch's runs warn once.
        """
        key = (opts.content_layer, opts.layer_weights, bool(opts.content_weight), opts.tile, opts.max_memory)
        if key in self._checked:  # once per setting: a batch's runs warn once
            return
        have = self.net.taps
        if opts.content_weight and opts.content_layer not in have:
            raise OptionError("content_layer", f"{opts.content_layer} is not a layer of {self.model}'s loss network, which has {', '.join(have)}")
        if opts.layer_weights is None:
            if missing := [t for t in TAPS if t not in have]:
                warn(f"{self.model}'s loss network stops at {have[-1]}: the style loss leaves out {', '.join(missing)}")
        elif missing := [k for k, v in opts.layer_weights if v and k not in have]:
            raise OptionError("layer_weights", f"{', '.join(missing)}: not layers of {self.model}'s loss network, which has {', '.join(have)}; weigh them 0")
        for note in tile_notes(self.net, opts):
            warn(note, TileWarning)
        self._checked.add(key)

    def check_budget(self, opts: OptimizeOptions, height: int, width: int) -> None:
        """OptionError (``max_memory``) where the budget cannot hold the last scale of a ``height`` x ``width`` content."""
        if opts.content_size:
            height, width = resized_size(height, width, opts.content_size)
        sh, sw = scale_sizes(height, width, opts.scales)[-1]
        plan_memory(self.net, sh, sw, opts, self.net.channels(opts.content_layer))

    def __enter__(self) -> Optimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        content: ImageLike,
        style: ImageLike,
        *,
        output: str | os.PathLike | None = None,
        state_dir: str | os.PathLike | None = None,
        on_progress: ProgressCallback | None = None,
        on_tile: TileCallback | None = None,
        **settings: Unpack[OptimizeSettings],
    ) -> np.ndarray:
        """Optimize one image; returns (H, W, 3) uint8 (the content's size after ``content_size``).

        ``settings``: as `make_optimize_options`. ``output``: also write the
        image there (atomically). ``state_dir``: save the state there every
        ``save_every`` iterations and after each scale, resume from it when it
        matches, remove it once done. Raises `ImageError` for a bad image,
        `OptionError` for a bad setting.
        """
        if output is not None:
            output = check.output_file(output, [content, style])  # before any work, as `Stylizer.stylize`
        if output is not None and "options" not in settings:
            settings["format"] = check.output_format(output, settings.get("format"), FORMATS)  # as `Stylizer.stylize`: from the name
        opts = settings.pop("options", None)  # the command line validates its settings once for the batch
        if opts is None:
            check.known_keywords(settings, _SETTINGS, _MODEL_KEYS, "Optimizer(...) (or to ultrastyle.optimize)", CALL_KEYWORDS)
            opts = make_optimize_options(**settings)
        elif settings or not isinstance(opts, OptimizeOptions):
            raise TypeError("give either options (an OptimizeOptions) or settings, not both")
        elif output is not None:  # the options' format, which the output's name must not contradict
            check.output_format(output, opts.format, FORMATS)
        self.check(opts)
        if state_dir is not None:
            sweep_stale(Path(state_dir).absolute().parent)  # a killed run's temps; its state, moved aside mid-save, put back
            if what := foreign_state(Path(state_dir)):
                raise OptionError("state_dir", f"{state_dir} is {what}; a run replaces its state folder and removes it when done: give a "
                                               "new folder")  # fmt: skip
        with ieee_fp32(self.device):  # on CUDA: TF32 off, or the tiled gradient drifts from the whole image's (~3e-2)
            if not self.threads:
                return self._run_or_restart(content, style, opts, output, state_dir, on_progress, on_tile)
            threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return self._run_or_restart(content, style, opts, output, state_dir, on_progress, on_tile)
            finally:
                torch.set_num_threads(threads)

    def resumes(self, content: ImageLike, style: ImageLike, options: OptimizeOptions, state_dir: str | os.PathLike) -> bool:
        """Whether a run with these inputs and ``options`` would resume the state saved in ``state_dir`` (its fingerprint
        matches; the images' headers and dates, not their pixels, are read)."""
        try:
            fingerprint = self._fingerprint(as_source(content, "content"), as_source(style, "style"), options)
        except OSError:  # an input gone: its run says so
            return False
        return _read_state(Path(state_dir), fingerprint) is not None

    def _fingerprint(self, content: Any, style: Any, opts: OptimizeOptions) -> str:
        """What a saved state must match to be resumed: the inputs (path, size, date), the model and the trajectory's settings."""
        return hashlib.sha256(json.dumps(
            [STATE_VERSION, _source_key(content), _source_key(style), str(self.model), opts.trajectory()], default=str
        ).encode()).hexdigest()  # fmt: skip

    def _run_or_restart(self, *args: Any) -> np.ndarray:
        try:
            return self._run(*args)
        except _StartOver:  # a damaged saved state, removed: the run starts from its init
            return self._run(*args)

    def _run(self, content: ImageLike, style: ImageLike, opts: OptimizeOptions, output: str | os.PathLike | None,
             state_dir: str | os.PathLike | None, on_progress: ProgressCallback | None, on_tile: TileCallback | None) -> np.ndarray:  # fmt: skip
        from ultrastyle.runtime.tiled import canvas_to_image

        c_src, content_full = read_input(content, "content", opts.max_pixels)
        s_src, style_full = read_input(style, "style", opts.max_pixels)
        if opts.content_size:
            content_full = resize_long_side(content_full, opts.content_size)
        h, w = content_full.shape[-2:]
        sizes = scale_sizes(h, w, opts.scales)
        fingerprint = self._fingerprint(c_src, s_src, opts)
        state = Path(state_dir) if state_dir is not None else None
        resume = _read_state(state, fingerprint) if state is not None else None
        if state is not None and resume is None and (state / "state.json").is_file():
            why = "cannot be read" if _read_state(state, None) is None else "is of other inputs or settings"
            warn(f"{state}: the saved state {why}; starting over (it is replaced at the first save)", StateWarning)
        start = resume["scale"] if resume else 0
        t0 = time.perf_counter()
        solver: Solver | None = None
        saving = state is not None

        def save(scale: int) -> None:
            """The state, or (a full disk: the solver's canvases need more room than the image) one warning and no more saves."""
            nonlocal saving
            if not saving:
                return
            assert state is not None and solver is not None
            try:
                _save_state(state, fingerprint, scale, solver)
            except OSError as exc:
                saving = False
                warn(f"{state}: cannot save the optimization state ({exc.strerror or exc}); this image goes on without "
                     "saving it (an interruption resumes from the last state saved, if any)", StateWarning)  # fmt: skip
        try:
            for i in range(start, len(sizes)):
                sh, sw = sizes[i]
                content_i = resize_long_side(content_full, max(sh, sw)) if (sh, sw) != (h, w) else content_full
                if i == len(sizes) - 1:
                    content_full = None  # type: ignore[assignment]  # the last scale's canvases hold it now
                mem = plan_memory(self.net, sh, sw, opts, self.net.channels(opts.content_layer))
                plan = plan_gradient(self.net, sh, sw, mem.core)
                target, closing = self._target(content_i, style_full, opts, mem, plan)
                try:
                    x = Canvas.at(mem.site, 3, sh, sw)
                    resuming = i == start and resume is not None  # x comes from the saved state
                    if solver is not None:
                        upsample(solver.x, x)  # coarse to fine: the previous scale's result
                    elif not resuming:
                        self._init(x, content_i, style, opts)
                    del content_i
                    previous, solver = solver, make_solver(opts.solver, x, mem.site, **_solver_settings(opts))
                    if previous is not None:
                        previous.close()
                    if resuming:
                        try:
                            solver.load(state / "solver")  # type: ignore[operator]
                        except (OSError, ValueError, KeyError) as exc:  # damaged (a power cut after the rename): start over
                            warn(f"{state}: the saved state cannot be read ({exc}); starting over", StateWarning)
                            with contextlib.suppress(OSError):  # what is left is swept by a later run
                                remove_tree(state)
                            raise _StartOver from None
                    objective = _Objective(self.net, target, opts.weights, plan, on_tile)
                    while solver.iterations < opts.iterations:
                        value = solver.step(objective)
                        if on_progress is not None:
                            on_progress(ProgressEvent(i, len(sizes), (sh, sw), solver.iterations, opts.iterations, value,
                                                      time.perf_counter() - t0, len(plan.tiles)))  # fmt: skip
                        if opts.save_every and solver.iterations % opts.save_every == 0:
                            save(i)
                    if i < len(sizes) - 1:
                        save(i)
                finally:
                    for canvas in closing:
                        canvas.close()
            assert solver is not None
            image = canvas_to_image(solver.x)
        finally:
            if solver is not None:
                solver.close()
        if output is not None:
            from ultrastyle.io.pyramid import output_meta, save_output

            save_output(image, output, opts.format, meta=output_meta(c_src, image, opts.metadata))
        if state is not None:
            with contextlib.suppress(OSError):  # the output is written: a state left is swept by a later run
                remove_tree(state)
        return image

    def _target(self, content: torch.Tensor, style: torch.Tensor, opts: OptimizeOptions, mem: MemoryPlan,
                plan: GradientPlan) -> tuple[StyleTarget, list[Canvas]]:  # fmt: skip
        """The style's Grams at this scale and the content layer's features; the canvases to close afterwards."""
        sh, sw = content.shape[-2:]
        if opts.style_size is None:  # the scale's long side, at most the style's own
            side = min(max(sh, sw), max(style.shape[-2:]))
        else:  # 0: the style's own size (as `ultrastyle stylize --style-size 0`)
            side = opts.style_size or max(style.shape[-2:])
        style = resize_long_side(style, side)
        # The style's pass is tiled for its own size: a style larger than the content (whose plan may be one
        # tile) would otherwise run whole, past the budget.
        try:
            in_ram = mem.canvas_bytes if mem.site.disk_dir is None else 0  # the content's canvases, alive meanwhile
            style_core = mem.core if opts.tile is not None else plan_memory(self.net, *style.shape[-2:], opts, 0, beside=in_ram).core
        except OptionError as exc:
            raise OptionError("max_memory", f"the style at {style.shape[-1]}x{style.shape[-2]}: {exc.message}; or lower style_size") from None
        style_c = canvas_from_array(style.numpy(), layout="chw")
        content_c = canvas_from_array(content.numpy(), layout="chw", disk_dir=mem.site.disk_dir)
        s = self.net.scale(opts.content_layer)
        feats = Canvas(self.net.channels(opts.content_layer), plan.padded_height // s, plan.padded_width // s, disk_dir=mem.site.disk_dir)
        try:
            target = style_target(self.net, style_c, content_c, opts.weights, mem.core, content_features=feats, style_core=style_core)
        except BaseException:
            feats.close()
            raise
        finally:
            style_c.close()
            content_c.close()
        return target, [feats]

    def _init(self, x: Canvas, content: torch.Tensor, style: ImageLike, opts: OptimizeOptions) -> None:
        if opts.init == "noise":
            _noise(x, opts.seed)
            return
        if opts.init == "wct":
            pixels = _wct(self.model, content, style, opts)
            with canvas_from_array(pixels) as c:
                vec.combine(x, [(1.0, c)])
            return
        for r in range(0, content.shape[1], 256):  # band by band: no second image-sized copy in RAM
            x.write(r, 0, content[:, r : r + 256].numpy())


def _wct(model: Any, content: torch.Tensor, style: ImageLike, opts: OptimizeOptions) -> np.ndarray:
    """ultrastyle's own WCT cascade (its model defaults) on the first scale's content: (H, W, 3) uint16."""
    from ultrastyle.api import Stylizer

    if not isinstance(model, (str, os.PathLike)):
        raise OptionError("init", "'wct' needs a model name or folder with decoders, not a bare encoder")
    pixels = np.ascontiguousarray(content.permute(1, 2, 0).numpy())
    with Stylizer(model, progress=False) as s:
        return s.stylize(pixels, style, depth=16, max_memory=opts.max_memory, style_size=max(pixels.shape[:2]) if opts.style_size is None else opts.style_size,
                         max_pixels=opts.max_pixels)  # fmt: skip


def _solver_settings(opts: OptimizeOptions) -> dict:
    return {"history": opts.history} if opts.solver == "lbfgs" else {"lr": opts.lr}


def foreign_state(folder: Path) -> str | None:
    """What ``folder`` is when it holds anything but a saved state (a run replaces it, and removes it once done); None when free."""
    if not folder.exists() or (folder.is_dir() and ((folder / "state.json").is_file() or not any(folder.iterdir()))):
        return None
    return "a file" if not folder.is_dir() else "a folder without an optimization state (no state.json)"


def _save_state(folder: Path, fingerprint: str, scale: int, solver: Solver) -> None:
    """The run's state, swapped in whole (`atomic_dir`): a kill at any moment leaves the old state or the new one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        (tmp / "solver").mkdir()
        solver.save(tmp / "solver")
        (tmp / "state.json").write_text(json.dumps({"version": STATE_VERSION, "fingerprint": fingerprint, "scale": scale}), encoding="utf-8")


def _read_state(folder: Path, fingerprint: str | None) -> dict | None:
    """The saved state's header when it matches this run (``fingerprint`` None: any readable one), else None (a run starts over)."""
    try:
        meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or (fingerprint is not None and (meta.get("version") != STATE_VERSION or meta.get("fingerprint") != fingerprint)):
        return None
    return meta


def optimize(
    content: ImageLike,
    style: ImageLike,
    *,
    model: Any = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int = 0,
    progress: bool = True,
    output: str | os.PathLike | None = None,
    state_dir: str | os.PathLike | None = None,
    on_progress: ProgressCallback | None = None,
    on_tile: TileCallback | None = None,
    **settings: Unpack[OptimizeSettings],
) -> np.ndarray:
    """Stylize ``content`` by optimization (Gatys et al.) with ``model``'s encoder as the loss network; (H, W, 3) uint8.

    ``settings``: iterations (per scale), scales, init ("content", "noise",
    "wct"), solver ("lbfgs", "adam"), content_weight (α), style_weight (β),
    layer_weights, content_layer, content_size, style_size, max_memory, tile,
    save_every, seed, ... (`make_optimize_options`). ``output``, ``state_dir``:
    as `Optimizer.run`; ``dtype``, ``threads``, ``progress`` (the model's
    download bar): as `Optimizer`. For many images, open an `Optimizer` once.
    """
    check.known_keywords(settings, _SETTINGS, _MODEL_KEYS, "ultrastyle.optimize or Optimizer(...)", CALL_KEYWORDS)  # before the model loads
    with Optimizer(model, device=device, dtype=dtype, threads=threads, progress=progress) as o:
        return o.run(content, style, output=output, state_dir=state_dir, on_progress=on_progress, on_tile=on_tile, **settings)
