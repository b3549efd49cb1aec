"""The Python API: `stylize` one image, `load` a `Stylizer` for many, `stylize_batch` for folders.

    import ultrastyle

    out = ultrastyle.stylize("photo.jpg", "art.jpg")              # (H, W, 3) uint8
    with ultrastyle.load("ultrastyle-adain-16x") as s:            # the model's defaults: adain, 1.0, stage 4
        a = s.stylize(photo_array, "art.jpg", max_memory="1GB")
        b = s.stylize(photo_array, mix=[("a.jpg", 0.7), ("b.jpg", 0.3)], output="mix.png")
    summary = ultrastyle.stylize_batch(["photos/"], ["art.jpg"], "out/")

Settings left as None take the model's own defaults (its zoo entry, the
``defaults`` of a model folder's ``architecture.json``, or a bundle's
manifest), resolved here once for the command line and for Python alike.
"""

from __future__ import annotations

import inspect
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict, Union

import numpy as np
from typing_extensions import Unpack  # typing's own from Python 3.11
from PIL import Image

from ultrastyle import options as check
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.core.tile_memory import DEFAULT_BUDGET
from ultrastyle.io.constants import format_name
from ultrastyle.io.images import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_STYLE_SIZE
from ultrastyle.io.metadata import METADATA
from ultrastyle.io.pyramid import DZI_TILE_FORMATS, OUTPUT_FORMATS, TIFF_COMPRESSIONS, TIFF_LAYOUTS, PyramidOptions, output_meta, save_output
from ultrastyle.io.masks import check_mask_size
from ultrastyle.io.paths import expand_inputs
from ultrastyle.models.defaults import ModelDefaults
from ultrastyle.models.sources import available_stages, model_defaults
from ultrastyle.models.pretrained import DEFAULT_MODEL
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.options import OptionError, output_format  # noqa: F401 - output_format re-exported
from ultrastyle.runtime.backends.base import Runner
from ultrastyle.runtime.backends.select import check_runner_options, open_runner
from ultrastyle.io.sources import ImageInput, ImageLike, Source, as_source
from ultrastyle.runtime.batch import StyleBook, STREAMING, StylizeOptions, run_batch, stylize_content
from ultrastyle.runtime.decode import decode
from ultrastyle.runtime.pairs import BatchSummary, Pair, PairResult, StyleSpec, plan_pairs, shard_pairs
from ultrastyle.runtime.memory import hold_freed_memory, release_freed_memory
from ultrastyle.core.color import MODES as COLOR_MODES
from ultrastyle.export.bundle import Bundle
from ultrastyle.core.styles import mix_weights
from ultrastyle.core.plan import BudgetTooSmall, TileWarning, TilingOptions, check_budget, fixed_tile_notes, size_text
from ultrastyle.runtime.tiled import TileCallback

# Style books (statistics per style) a Stylizer keeps, one per combination of the settings they depend on (`Stylizer._book`).
BOOKS_KEPT = 8
_BOOKS_LOCK = threading.Lock()  # the books of every Stylizer: held for dictionary work only, never while computing


MixLike = Union[Mapping[Union[str, os.PathLike], float], Sequence[tuple[ImageLike, float]]]

__all__ = [
    "BatchSettings", "CallSettings", "ClusterStylizer", "ImageLike", "ImageSettings", "OneBatchSettings", "OneImageSettings",
    "OptionError", "RunnerSettings", "Stylizer", "load", "make_options", "stylize", "stylize_batch",
]  # fmt: skip


def make_options(
    defaults: ModelDefaults,
    *,
    method: str | None = None,
    alpha: float | None = None,
    levels: Sequence[int] | str | None = None,
    preserve_color: str = "none",
    content_size: int = 0,
    style_size: int = DEFAULT_STYLE_SIZE,
    max_memory: int | str | None = DEFAULT_BUDGET,
    tile: int | str | None = None,
    halo: int | str | None = None,
    scratch: str | os.PathLike | None = None,
    format: str = "png",  # noqa: A002 - the name users know from --format
    depth: int = 8,
    png_level: int = DEFAULT_PNG_LEVEL,
    skip_existing: bool = False,
    shard: str | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    io_workers: int = 0,
    io_memory: int | str | None = None,
    tiff_layout: str = "auto",
    tiff_compression: str = "deflate",
    dzi_tiles: str = "jpg",
    streaming: str = "auto",
    metadata: str = "keep",
) -> StylizeOptions:
    """Every setting of a run, validated, with ``None`` resolved from the model's ``defaults`` (a `Stylizer`'s ``.defaults``).

    ``max_memory``: what a run may hold above its baseline (the interpreter, libraries and model;
    `runtime.memory.measure_baseline`), in bytes or ``"2GB"`` (binary units: 2 GiB): a quarter for decoded contents and
    outputs waiting to be encoded (``io_memory`` to set it), the rest for the tiles and canvases;
    None: no budget, every stage on the whole image, or in tiles of ``tile`` where one is given. ``format``: png, jpg, tiff or
    dzi (a Deep Zoom pyramid and its viewer page, written from the canvas
    band by band; ``dzi_tiles`` "jpg" or lossless "png"). ``tiff_layout``:
    "plain", "pyramid" (tiled, with reduced levels, written band by band) or
    "auto" (a pyramid above 8192 pixels, or with jpeg); ``tiff_compression``:
    "deflate", "zstd" or "jpeg" (8-bit pyramids only). ``tile``: a fixed tile core side
    (None or ``"auto"``: fitted to the budget). ``halo``: None or ``"exact"``
    for the exact result, else at most that many pixels (approximate).
    ``streaming``: read content files a band at a time (libvips, the ``vips``
    extra): "auto" where a whole read would not fit beside the budget,
    "always", or "never". ``content_size``, ``style_size``: long sides in
    pixels, 0 keeping the image's own size. ``max_pixels``: the largest image
    decoded. ``metadata``: what outputs keep of their content file's (`io.metadata`): "keep" its resolution, scaled with
    the resize, and EXIF (GPS left out), "all" (GPS too) or "none". Each setting is checked by `ultrastyle.options` (the rules
    `make_optimize_options` shares). Raises `OptionError` naming the setting.
    """
    method, alpha, levels = check.method(method), check.alpha(alpha), check.levels(levels)
    content_size, style_size = check.image_size("content_size", content_size), check.image_size("style_size", style_size)
    max_pixels = check.pixel_limit("max_pixels", max_pixels)
    png_level = check.count("png_level", png_level)
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth not in (8, 16):  # not "0 or more"
        raise OptionError("depth", f"expected 8 or 16 (bits per sample), got {depth!r}; give 8, or 16 for png or tiff")
    depth = int(depth)
    io_workers = check.count("io_workers", io_workers, what="reader and encoder threads")
    if io_workers > check.MAX_THREADS_PER_CORE * check.usable_cpus():
        raise OptionError("io_workers", f"expected at most {check.MAX_THREADS_PER_CORE} per core ({check.usable_cpus()} cores here), "
                                        f"got {io_workers}; 0 picks half the cores")  # fmt: skip
    preserve_color = check.choice("preserve_color", preserve_color, COLOR_MODES)
    fmt = check.format_choice("format", format, OUTPUT_FORMATS)
    if depth == 16 and fmt in ("jpg", "dzi"):
        raise OptionError("depth", f"16 bits need png or tiff, not {fmt}; give depth 8, or format png or tiff")
    tiff_layout = check.choice("tiff_layout", tiff_layout, TIFF_LAYOUTS)
    tiff_compression = check.choice("tiff_compression", tiff_compression, TIFF_COMPRESSIONS)
    dzi_tiles = check.choice("dzi_tiles", dzi_tiles, DZI_TILE_FORMATS)
    if depth == 16 and fmt == "tiff" and tiff_compression == "jpeg":
        raise OptionError("tiff_compression", "jpeg holds 8-bit samples; use deflate or zstd with depth 16")
    if tiff_layout == "plain" and tiff_compression == "jpeg":
        raise OptionError("tiff_compression", "jpeg compresses pyramidal TIFFs (tiles); a plain TIFF takes deflate or zstd")
    if not 0 <= png_level <= 9:
        raise OptionError("png_level", f"expected a zlib level 0..9, got {png_level}; give 0 (fastest) to 9 (smallest)")
    streaming = check.choice("streaming", streaming, STREAMING)
    io_bytes, budget = check.memory_budget("io_memory", io_memory), check.memory_budget("max_memory", max_memory)
    if io_bytes is not None and budget is not None and io_bytes >= budget:
        raise OptionError("io_memory", f"expected less than max_memory ({budget} bytes), which it is a part of; got {io_bytes}")
    tile_side, halo_width = check.tile_side("tile", tile), check.halo_width("halo", halo)
    if budget is None and tile_side is None and halo_width is not None:  # it would be dropped without a word
        raise OptionError("halo", f"{halo_width} px bounds the overlap of tiles, and max_memory=None without a tile runs each stage "
                                  "on the whole image; give a tile side or a budget, or leave halo out")  # fmt: skip
    tiling = TilingOptions(
        tile=tile_side,
        max_memory=budget,
        halo=halo_width,
        scratch_dir=check.scratch_folder("scratch", scratch),
    )
    return StylizeOptions(
        method=method or defaults.method,
        alpha=defaults.alpha if alpha is None else alpha,
        levels=levels or defaults.levels,
        content_size=content_size, style_size=style_size, format=fmt, skip_existing=skip_existing, shard=check.shard("shard", shard),
        max_pixels=max_pixels, depth=depth, tiling=tiling, preserve_color=preserve_color, png_level=png_level,
        io_workers=io_workers, io_memory=io_bytes,
        pyramid=PyramidOptions(tiff_layout=tiff_layout, tiff_compression=tiff_compression, dzi_tile_format=dzi_tiles),
        streaming=streaming, metadata=check.choice("metadata", metadata, METADATA),
    )  # fmt: skip


class CallSettings(TypedDict, total=False):
    """The settings a `load` gives every call (`make_options`' keywords but ``levels`` and a batch's own)."""

    method: str | None
    alpha: float | None
    preserve_color: str
    content_size: int
    style_size: int
    max_memory: int | str | None
    tile: int | str | None
    halo: int | str | None
    scratch: str | os.PathLike | None
    format: str
    depth: int
    png_level: int
    max_pixels: int
    io_workers: int
    io_memory: int | str | None
    tiff_layout: str
    tiff_compression: str
    dzi_tiles: str
    streaming: str
    metadata: str


class ImageSettings(CallSettings, total=False):
    """The settings of one image (`Stylizer.stylize`)."""

    levels: Sequence[int] | str | None


class BatchSettings(ImageSettings, total=False):
    """The settings of a batch (`Stylizer.stylize_batch`): every keyword of `make_options`."""

    skip_existing: bool
    shard: str | tuple[int, int] | None


class RunnerSettings(TypedDict, total=False):
    """How the model runs (`Stylizer`'s keywords), as the one-call functions take them."""

    backend: str
    device: str
    precision: str
    compile: bool
    threads: int
    on_message: Callable[[str], None] | None
    progress: bool


class OneImageSettings(ImageSettings, RunnerSettings, total=False):
    """`stylize`'s keywords: the image's settings and the runner's."""


class OneBatchSettings(BatchSettings, RunnerSettings, total=False):
    """`stylize_batch`'s keywords: the batch's settings and the runner's."""


def _label_array(mask: ImageLike) -> ImageLike:
    """A bool or integer label array as the uint8/uint16 image whose grey levels are its labels (other masks as given)."""
    if not isinstance(mask, np.ndarray) or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        return mask
    if mask.dtype == bool:
        return mask.astype(np.uint8) * 255
    if mask.size and (mask.min() < 0 or mask.max() > 65535):
        raise OptionError("mask", f"integer labels must lie in 0..65535, got {mask.min()}..{mask.max()}")
    return mask.astype(np.uint16 if mask.size and mask.max() > 255 else np.uint8)


def check_style_args(style: ImageLike | Sequence[ImageLike] | None, mix: MixLike | None, mask: ImageLike | None,
                keyword: str = "style") -> tuple[list[ImageLike], tuple[float, ...] | None]:  # fmt: skip
    """The styles and mix weights of one output, checked (`OptionError`) but not read: cheap, so callers check before a model opens.

    ``keyword``: the caller's name for ``style`` (``styles`` in `stylize_batch`).
    """
    if mix is not None:
        if style is not None:
            raise OptionError("mix", f"give either {keyword} (one output per style) or a mix (one blended output)")
        if mask is not None:
            raise OptionError("mix", "a mask takes one style per label, not a mix")
        items = list(mix.items()) if isinstance(mix, Mapping) else list(mix)
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise OptionError("mix", "expected (style, weight) pairs or a {style: weight} dict, e.g. [('a.jpg', 0.7), ('b.jpg', 0.3)]")
        if len(items) < 2:
            raise OptionError("mix", f"a mix blends two or more styles; give one style as {keyword}=")
        for i, (s, w) in enumerate(items):
            try:
                check.number("mix", w, least=0, example=0.5)
            except OptionError as exc:  # which style's weight
                raise OptionError("mix", f"the weight of {os.fspath(s) if isinstance(s, (str, os.PathLike)) else _nth('style', i)}: "
                                         f"{exc.message}") from None  # fmt: skip
        paths = [os.path.abspath(s) for s, _ in items if isinstance(s, (str, os.PathLike))]
        if twice := sorted({p for p in paths if paths.count(p) > 1}):
            raise OptionError("mix", f"{twice[0]} is given twice; give each style once with its weight")
        try:
            return [s for s, _ in items], mix_weights([float(w) for _, w in items])
        except ValueError as exc:
            raise OptionError("mix", str(exc)) from None
    if style is None:
        raise OptionError(keyword, "no style given: " + ("give one style image per mask label" if mask is not None else "give a style image (or a mix)"))
    styles = list(style) if isinstance(style, (list, tuple)) else [style]
    if mask is None and len(styles) != 1:
        raise OptionError(keyword, "several styles make one output only as a mix or with a mask")
    return styles, None


def _style_spec(style: ImageLike | Sequence[ImageLike] | None, mix: MixLike | None, mask: ImageLike | None,
                keyword: str = "style") -> StyleSpec:  # fmt: skip
    """The style side of one output (`check_style_args`), its images as sources."""
    styles, weights = check_style_args(style, mix, mask, keyword)
    sources = tuple(as_source(s, _nth("style", i)) for i, s in enumerate(styles))
    if mask is not None:
        return StyleSpec(sources, mask=as_source(_label_array(mask), "mask", keep_alpha=True))
    return StyleSpec(sources, weights)


def model_source(model: str | os.PathLike | Bundle) -> str | os.PathLike:
    """A zoo name or a folder as given (``~`` expanded); a `Bundle` (what `export_model` and `calibrate` return) as its folder.

    A `Path` whose text is a zoo name (``Path("cd-wct-16x")``) is that folder, made absolute: kept as text later, it
    would name the zoo's model (`is_zoo_name`)."""
    if isinstance(model, Bundle):
        return model.path
    source = check.model_path(model)
    return Path(os.path.abspath(source)) if not isinstance(source, str) and is_zoo_name(os.fspath(source)) else source


def _call_defaults(defaults: ModelDefaults, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings given at load for every call, checked as a call's are (a typo, a bad value: `OptionError`)."""
    if batch_only := sorted(_BATCH_SETTINGS & set(settings)):  # a batch's choice, not the model's: stylize() refuses it
        raise OptionError(batch_only[0], "applies to stylize_batch calls; give it there")
    check_settings(settings, _SETTINGS - _BATCH_SETTINGS, model_keys=(), at_load=True)
    make_options(defaults, **settings)
    return dict(settings)


class Stylizer:
    """A model opened on one backend and device, for many images; style statistics are cached per style.

    ``model``: a zoo name (installed on first use), a weights folder or a bundle
    (its folder, or the `Bundle` that `export_model` and `calibrate` return).
    ``levels``: the stages to load and run by default (default: the
    model's default levels); calls may run any of them. ``precision`` and
    ``compile`` (half-precision and compiled PyTorch networks): see
    `runtime.backends.select.open_runner`. ``settings``: defaults of every call (as `make_options`: alpha,
    max_memory, format, ...; checked here, before the model opens), which a call's own settings override.
    Use as a context manager, or call `close`.
    """

    def __init__(
        self,
        model: str | os.PathLike | Bundle = DEFAULT_MODEL,
        *,
        backend: str = "auto",
        device: str = "cpu",
        precision: str = "fp32",
        compile: bool = False,
        threads: int = 0,
        levels: Sequence[int] | str | None = None,
        on_message: Callable[[str], None] | None = None,
        progress: bool = True,
        **settings: Unpack[CallSettings],
    ) -> None:
        backend, device, precision = check_runner_options(backend=backend, device=device, precision=precision, compile=compile, threads=threads)
        model = model_source(model)
        self.model = str(model)
        defaults = model_defaults(model)
        stages = _levels_of(model, defaults, levels)
        self.defaults = replace(defaults, levels=stages)  # calls default to the levels loaded
        self.settings = _call_defaults(self.defaults, settings)
        # Process-wide while open: large tensors reuse freed heap pages (memory.hold_freed_memory; about half the wall
        # time of the PyTorch paths); the last Stylizer closed puts glibc's settings back.
        self._holds_heap, self._heap_release = False, None
        self._hold_heap()
        try:
            self.runner: Runner = open_runner(
                model, backend=backend, device=device, stages=tuple(sorted(set(stages))), threads=threads,
                on_export=on_message, precision=precision, progress=progress, compile=compile,
            )  # fmt: skip
            self.runner.activate()
        except BaseException:
            self._let_go_heap()
            raise
        self._books: OrderedDict[tuple, StyleBook] = OrderedDict()
        self._masks: OrderedDict = OrderedDict()  # label maps and statistics, shared by the books (`StyleBook`)
        self._stats: OrderedDict = OrderedDict()
        self._lock, self._calls, self._close_wanted = threading.RLock(), 0, False  # the calls running, and a close asked for

    @property
    def backend(self) -> str:
        return self.runner.backend

    @property
    def stages(self) -> tuple[int, ...]:
        return self.runner.stages

    def close(self) -> None:
        """Free the networks (idempotent); a later call opens them again.

        Calls running (in other threads, or the one whose callback closes) finish first: the networks are freed when
        the last of them returns.
        """
        with self._lock:
            self._close_wanted = True
            if self._calls == 0:
                self._close_now()

    def _close_now(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()
        with _BOOKS_LOCK:  # a call in another thread may be finding its book (a crash, clearing under it)
            self._books.clear()
            self._masks.clear()
            self._stats.clear()
        self._let_go_heap()

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """The networks open for one call: a `close` (or another thread's ``with`` block ending) waits for it."""
        with self._lock:
            self._calls += 1
            self._close_wanted = False  # a call after close() opens them again, and they stay open (as before)
            try:
                self._open()
            except BaseException:
                self._calls -= 1
                raise
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                if self._calls == 0 and self._close_wanted:
                    self._close_now()

    def _hold_heap(self) -> None:
        if not self._holds_heap:
            self._holds_heap = hold_freed_memory()
            if self._holds_heap:  # a Stylizer dropped unclosed lets go too (it held glibc's setting for the process's life)
                self._heap_release = weakref.finalize(self, release_freed_memory)

    def _let_go_heap(self) -> None:
        if self._holds_heap:
            self._holds_heap = False
            if self._heap_release is not None:
                self._heap_release.detach()
            release_freed_memory()

    def _open(self) -> None:
        if not self.runner.is_active:  # closed (a `with` block ended): the next use opens the networks again
            self._hold_heap()
            self.runner.activate()

    def __enter__(self) -> Stylizer:
        with self._lock:
            self._close_wanted = False
            self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # deferred while another thread's call runs; that thread's next call opens the networks again

    def options(self, **settings: Unpack[BatchSettings]) -> StylizeOptions:
        """`make_options` with this model's defaults and the settings given at load (``settings`` over them), checked
        against the loaded stages and the budget."""
        check_settings(settings)
        opts = make_options(self.defaults, **{**self.settings, **settings})
        missing = sorted(set(opts.levels) - set(self.stages))
        if missing:
            _levels_of(self.model, self.defaults, opts.levels)  # stages the model lacks: say which it has
            raise remedied(OptionError(
                "levels", f"stage(s) {missing} are not loaded (loaded: {list(self.stages)}); load the model with levels={list(opts.levels)}"
            ), Setting("levels", list(opts.levels)))
        try:  # before any work: a budget that cannot hold one tile, a tile larger than the runner accepts
            tiling = opts.tiling_for(self.runner.traits)
            check_budget(self.runner.arch, opts.levels, tiling, self.runner.traits, self.runner.device)
            for note in fixed_tile_notes(self.runner.arch, opts.levels, tiling, self.runner.traits):
                warn(note, TileWarning)
        except BudgetTooSmall as exc:  # in the caller's terms: the whole budget, of which the tiles get a share
            given, need = opts.resolved_tiling.max_memory or 0, opts.budget_for_tiles(exc.need, self.runner.traits)
            raise OptionError("max_memory", f"{size_text(given)} cannot hold one tile of stage {exc.stage}; give at least {size_text(need, up=True)}") from None
        except ValueError as exc:
            raise OptionError("tile" if opts.resolved_tiling.tile is not None else "max_memory", str(exc)) from None
        return opts

    def _book(self, opts: StylizeOptions) -> StyleBook:
        # Everything the statistics depend on, and how a style is read (streamed or whole).
        key = (opts.levels, opts.style_size, opts.max_pixels, opts.tiling_for(self.runner.traits), opts.streaming, opts.io_allowance)
        with _BOOKS_LOCK:  # calls from several threads: one may evict what another just found
            book = self._books.get(key)
            if book is not None:
                self._books.move_to_end(key)
            else:
                book = self._books[key] = StyleBook(self.runner, opts, self._masks, self._stats, key)
                while len(self._books) > BOOKS_KEPT:  # a service trying many settings: the least recently used go
                    self._books.popitem(last=False)
            return book

    def stylize(
        self,
        content: ImageLike,
        style: ImageLike | Sequence[ImageLike] | None = None,
        *,
        mix: MixLike | None = None,
        mask: ImageLike | None = None,
        output: str | os.PathLike | None = None,
        on_tile: TileCallback | None = None,
        **settings: Unpack[ImageSettings],
    ) -> np.ndarray:
        """Stylize one content image; returns (H, W, 3) uint8 (uint16 with ``depth=16``), held beside ``max_memory``
        (3 or 6 bytes a pixel, which the budget does not count: it is the caller's; `stylize_batch` writes files instead).

        ``content``, ``style``: paths, (H, W, 3) arrays (uint8, uint16 or
        float32 in [0, 1]) or PIL images. ``mix``: ``[(style, weight), ...]``
        blended into one output (instead of ``style``). ``mask``: a label image
        the content's size, one region per colour, taking the styles (a list)
        in ascending order of colour. ``output``: also write the image there
        (atomically; the format from its suffix unless ``format`` is given).
        ``on_tile(what, done, total)``: progress, after each tile of each pass
        (`runtime.tiled.TileCallback`).
        ``settings``: as `make_options` (method, alpha, levels, preserve_color,
        content_size, style_size, max_memory, tile, halo, depth, ...). Raises
        `ImageError` for a bad image, `OptionError` for a bad setting, ValueError when the budget cannot hold
        this image's tiles.
        """
        if settings.get("skip_existing"):
            raise OptionError("skip_existing", "applies to stylize_batch (outputs found are kept); stylize(output=...) always writes")
        if settings.get("shard") is not None:
            raise OptionError("shard", "parts a batch's contents; stylize() makes one image: give it to stylize_batch")
        _check_callbacks(on_tile=on_tile)
        if output is not None:
            output = check.user_path(output)  # "" stays "" for its own message
            given = settings.get("format")
            if given is None and "format" in self.settings:  # given at load: a default, which a format's suffix overrides
                suffix = format_name(Path(output).suffix.lstrip("."))
                given = None if suffix in OUTPUT_FORMATS else self.settings["format"]
            settings["format"] = _output_format(output, content, style, mix, mask, given)
        opts = self.options(**settings)
        spec = _style_spec(style, mix, mask)
        src = as_source(content, "content")
        if spec.mask is not None:
            check_mask_size(spec.mask, [src])  # from headers, before either is decoded
        pair = Pair(src, spec, None)
        with self._in_use():  # the book too: a close() in another thread cleared the books under it (a KeyError, a crash)
            book = self._book(opts)
            book.forget_errors()  # a style that failed an earlier call is read again
            (result,) = stylize_content(self.runner, decode(src, opts), [pair], book, opts, on_tile, raise_errors=True)
        assert result is not None and result.image is not None
        if output is not None:
            save_output(result.image, output, opts.format, depth=opts.depth, png_level=opts.png_level, pyramid=opts.pyramid,
                        meta=output_meta(src, result.image, opts.metadata))  # fmt: skip
        return result.image

    def stylize_batch(
        self,
        contents: ImageLike | Iterable[ImageLike],
        styles: ImageLike | Iterable[ImageLike] | None = None,
        output_dir: str | os.PathLike = "out",
        *,
        mix: MixLike | None = None,
        mask: ImageLike | None = None,
        on_result: Callable[[PairResult], None] | None = None,
        on_tile: TileCallback | None = None,
        on_plan: Callable[[list[Pair]], None] | None = None,
        **settings: Unpack[BatchSettings],
    ) -> BatchSummary:
        """Every content x style pair into ``output_dir`` as ``{content}_stylized_{style}.{ext}``, streamed.

        ``contents``, ``styles``: paths, folders (their images, sorted), globs,
        arrays or PIL images (named ``content`` / ``style`` then). ``mix``: one
        blended output per content instead of ``styles``; ``mask``: one output
        per content with ``styles`` one per label. A bad file fails its pairs
        (``status`` "failed", ``error`` naming it) and the rest run; results in
        pair order: ``on_result(PairResult)`` as each is known,
        ``on_tile`` as in `stylize`; ``on_plan(pairs)`` once, before any work, with the pairs
        this call will run (this part's, with ``shard``). In-memory images are checked before any
        work. Raises `OutputCollisionError` before any work when two
        pairs would write one file, ``BatchInterrupted`` (with the summary so
        far) on Ctrl-C.
        """
        _check_callbacks(on_tile=on_tile, on_result=on_result, on_plan=on_plan)
        opts = self.options(**settings)
        folder = check.output_folder("output_dir", output_dir)
        content_list = _sources(contents, "content", "contents")
        if mix is not None or mask is not None:
            specs: list[StyleSpec] = [_style_spec(_listed(styles) if styles is not None else None, mix, mask, "styles")]
        else:
            specs = [StyleSpec((s,)) for s in _sources(styles if styles is not None else [], "style", "styles")]
        if not content_list or not specs:
            keyword, given = ("contents", contents) if not content_list else ("styles", styles)
            searched = " ".join(os.fspath(p) for p in _listed(given) if isinstance(p, (str, os.PathLike))) if given is not None else ""
            raise OptionError(keyword, f"no images found in: {searched}" if searched else "no images given")
        pairs = shard_pairs(plan_pairs(content_list, specs, folder, opts.format), opts.shard)
        if specs[0].mask is not None:  # a mask of the wrong size fails before any work
            check_mask_size(specs[0].mask, [p.content for p in pairs])  # its header first: the labels are decoded whole
        with self._in_use():  # the book inside: a close() in another thread clears the books
            book = self._book(opts)
            book.forget_errors()  # statistics are kept across calls, errors within one: a fixed style is read again
            if specs[0].mask is not None:  # its label count, before the work (the labels are decoded whole, and kept)
                book.labels(specs[0].mask, len(specs[0].paths))
            if on_plan is not None:
                on_plan(list(pairs))
            return self._run_batch(pairs, opts, on_result, on_tile)

    def _run_batch(self, pairs: list[Pair], opts: StylizeOptions, on_result: Callable[[PairResult], None] | None,
                   on_tile: TileCallback | None) -> BatchSummary:  # fmt: skip
        return run_batch(self.runner, pairs, opts, on_result, on_tile, styles=self._book(opts))  # statistics kept across calls


def check_distributed(distribute_tiles: bool, masked: bool) -> None:
    """OptionError (``mask``) for masked outputs spread over a cluster, which `distributed.pool` cannot do: before Ray starts."""
    if distribute_tiles and masked:
        raise remedied(OptionError("mask", "mask regions are not spread over the cluster (distribute_tiles): run masked outputs one "
                                           "image per worker, without it"), Setting("distribute_tiles"))  # fmt: skip


class ClusterStylizer(Stylizer):
    """`Stylizer.stylize_batch` on Ray: a pool of actors, one runner each (`ultrastyle.distributed.pool.WorkerPool`).

    ``address``: ``"local"`` starts Ray on this machine alone (bound to
    127.0.0.1); ``host:port`` joins a running cluster, whose workers must see
    the model, inputs and output folder at the same paths. ``workers``,
    ``cpus_per_worker``: the pool (default: one actor per CPU of the cluster).
    ``distribute_tiles``: each image runs on every actor (its stages' tiles
    spread over them), one image after the other, for images too large or slow
    for one machine; the result equals the local one. Other keywords as
    `Stylizer`. Raises ``OptionError`` (a bad setting, before Ray starts),
    ``ClusterError`` (Ray missing or unreachable) or ``RunnerError`` (the
    workers cannot open the model).
    """

    def __init__(
        self,
        model: str | os.PathLike | Bundle = DEFAULT_MODEL,
        *,
        address: str = "local",
        workers: int | None = None,
        cpus_per_worker: float = 1.0,
        distribute_tiles: bool = False,
        backend: str = "auto",
        device: str = "cpu",
        precision: str = "fp32",
        threads: int = 0,
        compile: bool = False,
        levels: Sequence[int] | str | None = None,
        on_message: Callable[[str], None] | None = None,
        progress: bool = True,
        **settings: Unpack[CallSettings],
    ) -> None:
        from ultrastyle.distributed.pool import WorkerPool
        from ultrastyle.distributed.zarr_canvas import require_zarr

        del on_message, progress  # as `Stylizer` takes them; the workers open the model quietly
        if distribute_tiles:  # before Ray starts
            require_zarr()
        backend, device, precision = check_runner_options(backend=backend, device=device, precision=precision, compile=compile,
                                                          threads=threads)  # before Ray starts  # fmt: skip
        if device.startswith("cuda:"):  # an actor sees only the GPU Ray gives it, as its cuda:0
            raise OptionError("device", f"expected cpu or cuda on a Ray pool (each worker runs on the GPU Ray assigns it), got {device!r}")
        model = model_source(model)
        if isinstance(model, (str, os.PathLike)) and not is_zoo_name(model) and os.path.exists(model):  # a folder, as here
            model = os.path.abspath(model)
        self.model = str(model)
        defaults = model_defaults(model)
        stages = _levels_of(model, defaults, levels)
        self.defaults = replace(defaults, levels=stages)
        self.settings = _call_defaults(self.defaults, settings)
        self.distribute_tiles = distribute_tiles
        self._books = OrderedDict()
        self._masks, self._stats = OrderedDict(), OrderedDict()
        self._lock, self._calls, self._close_wanted = threading.RLock(), 0, False
        self._pool_args = dict(address=address, workers=workers, cpus_per_worker=cpus_per_worker, backend=backend,
                               device=device, precision=precision, threads=threads, compile=compile, stages=stages)  # fmt: skip
        self._closed = False
        self.pool = WorkerPool(model, **self._pool_args)
        self.runner = self.pool  # type: ignore[assignment] - what `options` reads: arch, traits, stages, backend

    def close(self) -> None:
        """Stop the actors (and a local Ray instance this started); idempotent. A later call starts the pool again."""
        super().close()

    def _close_now(self) -> None:
        self.pool.close()
        with _BOOKS_LOCK:
            self._books.clear()
            self._masks.clear()
            self._stats.clear()
        self._closed = True

    def _open(self) -> None:  # as a Stylizer reopens its networks: a new pool at the same address
        if self._closed:
            from ultrastyle.distributed.pool import WorkerPool

            self.pool = WorkerPool(self.model, **self._pool_args)
            self.runner = self.pool  # type: ignore[assignment]
            self._closed = False

    def stylize(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError("one image in memory runs locally: use ultrastyle.load(...).stylize, or stylize_batch here")

    def _run_batch(self, pairs: list[Pair], opts: StylizeOptions, on_result: Callable[[PairResult], None] | None,
                   on_tile: TileCallback | None) -> BatchSummary:  # fmt: skip
        check_distributed(self.distribute_tiles, any(p.style.mask is not None for p in pairs))
        scratch = opts.tiling.scratch_dir if opts.tiling is not None else None  # the stage arrays of distribute_tiles
        # Absolute: a joined cluster's workers run in the folder its head was started in, not this one (relative outputs
        # went there, and relative inputs were not found).
        pairs = [_absolute_pair(p) for p in pairs]
        if scratch is not None:
            scratch = scratch.absolute()
            opts = replace(opts, tiling=replace(opts.tiling, scratch_dir=scratch))
        return self.pool.run_batch(pairs, opts, on_result, on_tile, distribute_tiles=self.distribute_tiles, scratch=scratch)


def _absolute_pair(pair: Pair) -> Pair:
    """``pair`` with its paths absolute (in-memory images as they are)."""

    def absolute(src: Source) -> Source:
        return src.absolute() if isinstance(src, Path) else src

    style = replace(pair.style, paths=tuple(absolute(p) for p in pair.style.paths),
                    mask=absolute(pair.style.mask) if pair.style.mask is not None else None)  # fmt: skip
    return replace(pair, content=absolute(pair.content), style=style, output=pair.output.absolute() if pair.output else None)


def _levels_of(model: str | os.PathLike, defaults: ModelDefaults, levels: Sequence[int] | str | None) -> tuple[int, ...]:
    """``levels`` (None: the model's default levels) parsed, or OptionError where the model lacks one of them."""
    stages = make_options(defaults, levels=levels).levels
    have = available_stages(model)
    missing = sorted(set(stages) - set(have))
    if missing:
        raise OptionError("levels", f"model {os.fspath(model)} has stage(s) {list(have)}, not {missing}; choose levels among {list(have)}")
    return stages


def _listed(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image (a path is a string: not its characters) or many, as a list; an (N, H, W, C) array is N images.

    Another type of image array (a torch tensor: 2 dimensions or more) is a TypeError: iterated, it would be split
    into rows taken for images. A sequence of paths of any type (a pandas Series) is a sequence.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray, Image.Image)):
        return [images]
    if getattr(images, "ndim", 1) >= 2 and hasattr(images, "__array__"):
        raise TypeError(f"expected paths, (H, W, 3) arrays or PIL images, got a {type(images).__name__} of {images.ndim} "  # type: ignore[union-attr]
                        "dimensions; convert it to a numpy array (H, W, 3), or a list of them")  # fmt: skip
    return list(images)


_SETTINGS = frozenset(inspect.signature(make_options).parameters) - {"defaults"}
_BATCH_SETTINGS = frozenset({"skip_existing", "shard"})  # a batch's, not a model's or an image's


def check_settings(
    settings: Mapping[str, Any], allowed: frozenset[str] | None = None, model_keys: Sequence[str] | None = None,
    opener: str = "ultrastyle.load(...) (or to ultrastyle.stylize)", *, at_load: bool = False,
) -> None:
    """OptionError for a keyword that is no setting of a call: a typo (with the closest setting), or one of ``model_keys``.

    ``allowed``: the call's settings (default: `make_options`'); ``model_keys``: settings of the opened model
    instead, which belong to ``opener``. ``at_load``: settings kept by `load` for every call, where the calls' own
    arguments (``output``, ``style``) are no typo of a setting.
    """
    check.known_keywords(settings, _SETTINGS if allowed is None else allowed, _RUNNER_KEYS if model_keys is None else model_keys, opener,
                         _RUNNER_KEYS if at_load else _CALL_KEYWORDS, _CALLS_TAKING if at_load else None)  # fmt: skip


def _nth(role: str, i: int) -> str:
    """The name of the ``i``-th in-memory image of ``role`` (from 0): ``style``, ``style-2``, ... (output names hold no spaces)."""
    return role if i == 0 else f"{role}-{i + 1}"


def _no_empty_path(images: list[ImageLike], keyword: str) -> None:
    check.no_empty_path(keyword, [i for i in images if isinstance(i, (str, os.PathLike))])


def _sources(images: ImageLike | Iterable[ImageLike], role: str, keyword: str) -> list[Source]:
    """Paths, folders and globs expanded (`expand_inputs`); in-memory images named ``role``, ``role``-2, ...

    An empty path is an `OptionError` naming ``keyword``.
    """
    listed = _listed(images)
    _no_empty_path(listed, keyword)
    out: list[Source] = []
    paths: list[str] = []
    for image in listed:
        if isinstance(image, (str, os.PathLike)):
            paths.append(os.fspath(image))
            continue
        out += expand_inputs(paths)
        paths = []
        out.append(as_source(image, _nth(role, sum(isinstance(s, ImageInput) for s in out))))  # TypeError for what is no image
    return out + expand_inputs(paths)


load = Stylizer  # ``ultrastyle.load(model, ...)``: open ``model`` for many calls (the same arguments, typed)


# Each of the calls' own keywords, with the calls that take it: what `load` says of one given to it.
_BOTH, _BATCH = "stylize(...) or stylize_batch(...)", "stylize_batch(...)"
_RAY = "ultrastyle.stylize_batch(..., executor='ray'), or a ClusterStylizer(...) opened in place of load"
_CALLS_TAKING = {"content": "stylize(...)", "output": "stylize(...)", "contents": _BATCH, "output_dir": _BATCH, "on_result": _BATCH,
                 "style": "stylize(...) (stylize_batch takes styles)", "styles": _BATCH, "mix": _BOTH, "mask": _BOTH, "on_tile": _BOTH,
                 "executor": _RAY, "ray_address": "ultrastyle.stylize_batch(..., executor='ray') (a ClusterStylizer takes address)",
                 "distribute_tiles": _RAY, "workers": _RAY, "cpus_per_worker": _RAY}  # fmt: skip
# The stylize calls' own keyword arguments, for "did you mean" (a typo of them lands among the settings).
_CALL_KEYWORDS = ("model", *_CALLS_TAKING)
_RUNNER_KEYS = ("backend", "device", "precision", "compile", "threads", "on_message", "progress")


def _check_callbacks(**callbacks: object) -> None:
    """OptionError for a callback that cannot be called, before any work (not a TypeError at the first tile)."""
    for keyword, f in callbacks.items():
        if f is not None and not callable(f):
            raise OptionError(keyword, f"expected a function (or None), got {type(f).__name__} {f!r}")


def _output_format(output: str | os.PathLike, content: ImageLike, style: object, mix: MixLike | None, mask: ImageLike | None,
                   given: str | None) -> str:  # fmt: skip
    """The format ``output`` is written in, once it is known to be a file name that replaces no input (`OptionError`)."""
    styles = [style] if isinstance(style, (str, os.PathLike)) or not isinstance(style, Sequence) else list(style)
    mixed = list(mix) if isinstance(mix, Mapping) else [m[0] for m in mix or () if isinstance(m, (tuple, list)) and m]
    check.output_file(output, [content, mask, *styles, *mixed])
    return output_format(output, given)


def stylize(
    content: ImageLike,
    style: ImageLike | Sequence[ImageLike] | None = None,
    *,
    model: str | os.PathLike | Bundle = DEFAULT_MODEL,
    mix: MixLike | None = None,
    mask: ImageLike | None = None,
    output: str | os.PathLike | None = None,
    on_tile: TileCallback | None = None,
    **settings: Unpack[OneImageSettings],
) -> np.ndarray:
    """Stylize one image with ``model``: `load` then `Stylizer.stylize` (see both); returns (H, W, 3) uint8 (uint16 with ``depth=16``).

    For many images, `load` the model once instead.
    """
    runner_kw = {k: settings.pop(k) for k in _RUNNER_KEYS if k in settings}
    check_settings(settings)
    check_style_args(style, mix, mask)  # before the model opens (a download, an export)
    _check_callbacks(on_tile=on_tile)
    if output is not None:
        output = check.user_path(output)
        _output_format(output, content, style, mix, mask, settings.get("format"))
    with load(model, levels=settings.get("levels"), **runner_kw) as s:
        return s.stylize(content, style, mix=mix, mask=mask, output=output, on_tile=on_tile, **settings)


def stylize_batch(
    contents: ImageLike | Iterable[ImageLike],
    styles: ImageLike | Iterable[ImageLike] | None = None,
    output_dir: str | os.PathLike = "out",
    *,
    model: str | os.PathLike | Bundle = DEFAULT_MODEL,
    executor: str = "local",
    ray_address: str = "local",
    distribute_tiles: bool = False,
    workers: int | None = None,
    cpus_per_worker: float | None = None,
    mix: MixLike | None = None,
    mask: ImageLike | None = None,
    on_result: Callable[[PairResult], None] | None = None,
    on_tile: TileCallback | None = None,
    on_plan: Callable[[list[Pair]], None] | None = None,
    **settings: Unpack[OneBatchSettings],
) -> BatchSummary:
    """What ``ultrastyle stylize`` does: `load` then `Stylizer.stylize_batch` (see both).

    ``executor="ray"``: on a Ray cluster instead (`ClusterStylizer`, at ``ray_address``: ``"local"`` or
    ``host:port``; ``distribute_tiles``: each image across every worker; ``workers``, ``cpus_per_worker``: the
    pool, default one actor per CPU of the cluster, each with its own memory budget).
    """
    runner_kw = {k: settings.pop(k) for k in _RUNNER_KEYS if k in settings}
    check_settings(settings)
    output_dir = check.output_folder("output_dir", output_dir)  # before the model opens
    _check_callbacks(on_tile=on_tile, on_result=on_result, on_plan=on_plan)
    contents = _listed(contents)  # lists: checked here, read there (a generator would be spent)
    styles = _listed(styles) if styles is not None else None
    _no_empty_path(contents, "contents")
    _no_empty_path(styles or [], "styles")
    if mix is not None or mask is not None or styles is None:  # (many styles alone: an output each, nothing else to check)
        check_style_args(styles, mix, mask, "styles")
    executor = check.choice("executor", executor, ("local", "ray"))
    pool = {k: v for k, v in (("workers", workers), ("cpus_per_worker", cpus_per_worker)) if v is not None}
    if executor == "ray":
        check_distributed(distribute_tiles, mask is not None)
        opener: Callable[..., Stylizer] = lambda m, **kw: ClusterStylizer(  # noqa: E731
            m, address=ray_address, distribute_tiles=distribute_tiles, **pool, **kw)
    elif distribute_tiles:
        raise OptionError("distribute_tiles", "spreads an image over a Ray cluster: give executor='ray'")
    elif ray_address != "local":
        raise OptionError("ray_address", f"{ray_address!r} is a Ray cluster's address: give executor='ray' to run there")
    elif pool:
        raise OptionError(next(iter(pool)), "sizes the pool of Ray workers: give executor='ray' to run there")
    else:
        opener = load
    with opener(model, levels=settings.get("levels"), **runner_kw) as s:
        return s.stylize_batch(contents, styles, output_dir, mix=mix, mask=mask, on_result=on_result, on_tile=on_tile, on_plan=on_plan,
                               **settings)  # fmt: skip
