"""`ultrastyle stylize`: batch style transfer over files, folders and globs (a thin layer over `ultrastyle.api`)."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

from ultrastyle.cli import params
from ultrastyle.cli.logs import LogLines, warning_lines, where_outputs
from ultrastyle.cli.remedies import as_command, bad_parameter, given_flags, swap

from ultrastyle.core.tile_memory import DEFAULT_BUDGET
from ultrastyle.io.constants import DEFAULT_MAX_PIXELS, DEFAULT_PNG_LEVEL, DEFAULT_STYLE_SIZE
from ultrastyle.models import zoo
from ultrastyle.models.defaults import DEFAULT_MODEL
from ultrastyle.runtime.memory import use_huge_pages

if TYPE_CHECKING:
    from ultrastyle.options import OptionError


class Method(str, Enum):
    wct = "wct"
    adain = "adain"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class PreserveColor(str, Enum):
    none = "none"
    luminance = "luminance"
    match = "match"


class Format(str, Enum):
    png = "png"
    jpg = "jpg"
    tiff = "tiff"
    dzi = "dzi"
    jpeg = "jpeg"  # the aliases the library takes too (io.constants.format_name)
    tif = "tif"


class TiffLayout(str, Enum):
    auto = "auto"
    plain = "plain"
    pyramid = "pyramid"


class TiffCompression(str, Enum):
    deflate = "deflate"
    zstd = "zstd"
    jpeg = "jpeg"


class DziTiles(str, Enum):
    jpg = "jpg"
    png = "png"


class Streaming(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


# Columns the bar's counts and times take at most (bar 20, up to "12345.6/12345.6 MP" 18, two times of up to 8 for 10 h
# and more, 4 gaps), and the least room worth giving the output's name: below their sum the name is left out.
BAR_FIXED_WIDTH, NAME_MIN_WIDTH = 58, 12


def _mp(n: float | None) -> str:
    """Megapixels to 0.1, or to 0.01 below 1 MP (small images are not "0.0 MP"); ``?`` when unknown."""
    return "?" if n is None else f"{n:.1f}" if n >= 1 or n == 0 else f"{n:.2f}"


def _bar_columns(width: int) -> list[ProgressColumn]:
    """The bar's columns (``width``: the terminal's): the counts and times, kept whole, then the output's name, cut to
    the room left or left out, so that a long name or a narrow terminal never wraps a line or hides the counts."""
    whole = Column(no_wrap=True)
    if width < BAR_FIXED_WIDTH + NAME_MIN_WIDTH:
        return [BarColumn(bar_width=8, table_column=whole), MegapixelColumn(table_column=whole), TimeElapsedColumn(table_column=whole)]
    return [
        BarColumn(bar_width=20, table_column=whole), MegapixelColumn(table_column=whole),
        TimeElapsedColumn(table_column=whole), TimeRemainingColumn(table_column=whole),
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=width - BAR_FIXED_WIDTH)),
    ]  # fmt: skip


class MegapixelColumn(ProgressColumn):
    """``done/total MP``; ``done/? MP`` while the total is unknown (no content header could be read).

    A task with a ``unit`` field counts that instead (the tile line: ``done/total tiles``).
    """

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        if unit:
            return Text(f"{task.completed:.0f}/{'?' if task.total is None else f'{task.total:.0f}'} {unit}")
        return Text(f"{_mp(task.completed)}/{_mp(task.total)} MP")


def _drop(progress: Progress) -> None:
    """Stop and erase the progress bar: the run was refused before any work, so only the error is left on screen."""
    progress.live.transient = True
    # A log: nothing was drawn, and each stop (this one, the `with` block's) would print a blank line. The run ends here,
    # and its error goes through another console.
    progress.console.quiet = progress.console.quiet or not progress.console.is_terminal
    progress.stop()


# The library's keywords whose flag is not ``--kebab-case``.
_FLAGS = {"output_dir": "--output", "address": "--ray", "contents": "CONTENT", "styles": "--style"}


def _mix_items(items: list[str]) -> list[tuple[Path, float]]:
    """``["a.jpg=0.7", "b.jpg=0.3"]`` -> [(path, weight), ...]; one clear error per bad item.

    Parsed here; the weights and repeats are the library's rules (`api.check_style_args`), checked before the model opens.
    """
    paths: list[Path] = []
    weights: list[float] = []
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep or not name:
            raise typer.BadParameter(f"expected STYLE=WEIGHT, e.g. art.jpg=0.7, got {item!r}", param_hint="--mix")
        try:
            weights.append(float(weight))
        except ValueError:
            raise typer.BadParameter(f"weight of {name} is not a number: {weight!r}", param_hint="--mix") from None
        path = Path(name)
        if not path.is_file():
            raise typer.BadParameter(f"{name}: {'a folder; a mix takes one image per --mix' if path.is_dir() else 'no such style image file'}",
                                     param_hint="--mix")  # fmt: skip
        paths.append(path)
    if len(paths) < 2:  # `--mix a.jpg=0.7 b.jpg=0.3` gives one --mix (b.jpg=0.3 becomes a content)
        raise typer.BadParameter("a mix blends two or more styles, each given with its own --mix (--mix a.jpg=0.7 --mix b.jpg=0.3); "
                                 "for one style use --style", param_hint="--mix")  # fmt: skip
    from ultrastyle.api import OptionError, check_style_args

    try:
        check_style_args(None, list(zip(paths, weights)), None, "styles")
    except OptionError as exc:
        raise _bad_option(exc) from None
    return list(zip(paths, weights))


def _checked(keyword: str, value: Any) -> Any:
    """``value`` as the library's rule for ``keyword`` takes it (`ultrastyle.options`), its message as the flag's error."""
    from ultrastyle import options

    try:
        return getattr(options, keyword)(value)
    except options.OptionError as exc:
        raise typer.BadParameter(exc.message) from None


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)


# Flags that shape one output format only: given for another, they are said to be left out, not silently dropped.
_FORMAT_FLAGS = {"png_level": ("--png-level", "png"), "tiff_layout": ("--tiff-layout", "tiff"),
                 "tiff_compression": ("--tiff-compression", "tiff"), "dzi_tiles": ("--dzi-tiles", "dzi")}  # fmt: skip
# What --no-tile leaves without a meaning (whole images: no budget, no tiles, no halo).
_TILING_FLAGS = {"tile": "--tile", "max_memory": "--max-memory", "halo": "--halo"}


def _unused_flags(given: set[str], fmt: str) -> list[str]:
    """Warnings for the format flags ``given`` that this run's format leaves out."""
    from ultrastyle.io.constants import format_name

    fmt = format_name(fmt)
    said = [f"{flag} shapes {only} outputs only; this run writes {fmt}: left out"
            for name, (flag, only) in _FORMAT_FLAGS.items() if name in given and only != fmt]  # fmt: skip
    return said


def _bad_option(exc: OptionError) -> typer.BadParameter:
    return bad_parameter(exc, _FLAGS)


def _keeping_mask_labels(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with `io.masks.keep_labels` open: the mask checked before the model opens is not decoded again by the batch."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        from ultrastyle.io.masks import keep_labels

        with keep_labels():
            command(*args, **kwargs)

    return run


@_keeping_mask_labels
def stylize_command(
    ctx: typer.Context,
    content: Annotated[list[str], typer.Argument(metavar="CONTENT", help="Content images: files, folders or globs (quote globs). Without --style or --mix, the last one is the style.", show_default=False)],
    style: Annotated[list[str] | None, typer.Option("--style", "-s", help="Style image(s): file, folder or glob; repeat for more. Every content x style pair is made.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="FOLDER", help="Output folder; files are named {content}_stylized_{style}.{ext}.")] = "out",
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name (installed on first use), a folder of CD weights {k}SE.pth/{k}SD.pth, a pytorch-AdaIN folder (vgg_normalised.pth + decoder.pth), or a bundle folder (ultrastyle export).")] = DEFAULT_MODEL,
    method: Annotated[Method | None, typer.Option(case_sensitive=False, help="Feature transform (default: the model's, wct for the CD models)", show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option(callback=lambda v: _checked("alpha", v), help="Style strength (0..1): alpha*transformed + (1-alpha)*content features (default: the model's, 0.6 for the CD models)", show_default=False)] = None,
    levels: Annotated[str | None, typer.Option(help="Stages to run, in the order given (5,4,3,2,1 runs coarse to fine, as WCT does) (default: the model's, 5,4,3,2,1 for the CD models)", show_default=False)] = None,
    content_size: Annotated[int, typer.Option(min=0, help="Resize contents so the long side is this many pixels; 0 keeps the size.")] = 0,
    style_size: Annotated[int, typer.Option(min=0, help="Resize styles so the long side is this many pixels; 0 keeps the size.")] = DEFAULT_STYLE_SIZE,
    device: Annotated[str, typer.Option(metavar=params.DEVICE_METAVAR, parser=params.device, help="Where the networks run: the CPU, or a CUDA GPU (cuda:N: the N-th).")] = "cpu",
    backend: Annotated[Backend, typer.Option(case_sensitive=False, help="auto: TensorRT where this GPU has fresh engines (ultrastyle build), else ONNX Runtime; tensorrt: builds missing engines on first use; torch: the PyTorch reference.")] = Backend.auto,
    precision: Annotated[Precision, typer.Option(case_sensitive=False, help="fp32; int8 (the Q/DQ graphs from ultrastyle calibrate) on onnxruntime and tensorrt; fp16 on tensorrt, and on torch with --device cuda; bf16 on torch. Statistics and the style fit stay float64.")] = Precision.fp32,
    compile_: Annotated[bool, typer.Option("--compile", help="torch backend: compile the stage networks with torch.compile (Inductor; the first run of each tile shape compiles, cached on disk after).")] = False,
    threads: Annotated[int, typer.Option(min=0, help="Threads per network (0: one per physical core).")] = 0,
    fmt: Annotated[Format, typer.Option("--format", "-f", case_sensitive=False, help="Output format: png, jpg (quality 95), tiff (a tiled pyramid above 8192 px: --tiff-layout), dzi (a Deep Zoom pyramid NAME.dzi + NAME_files/ and NAME.html, an offline zoomable viewer). tiff pyramids and dzi are written from the canvas band by band.")] = Format.png,
    tiff_layout: Annotated[TiffLayout, typer.Option(case_sensitive=False, help="TIFF outputs: plain (one image), pyramid (256-px tiles and reduced levels, BigTIFF past 4 GB), auto (pyramid above 8192 px or with jpeg compression).")] = TiffLayout.auto,
    tiff_compression: Annotated[TiffCompression, typer.Option(case_sensitive=False, help="Compression of TIFFs: deflate or zstd (any layout), jpeg (8-bit; a pyramid).")] = TiffCompression.deflate,
    dzi_tiles: Annotated[DziTiles, typer.Option(case_sensitive=False, help="Deep Zoom tile format: jpg (quality 90) or png (lossless).")] = DziTiles.jpg,
    streaming: Annotated[Streaming, typer.Option(case_sensitive=False, help="Read content files a band of rows at a time (libvips, the vips extra): auto where a whole read would not fit beside --max-memory, always, never.")] = Streaming.auto,
    metadata: Annotated[params.Metadata, typer.Option(case_sensitive=False, help=params.METADATA_HELP)] = params.Metadata.keep,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip pairs whose output exists (resume an interrupted batch).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (in a log: no line per pair); warnings, errors and the summary still print.")] = False,
    shard: Annotated[str | None, typer.Option("--shard", metavar="K/N", help="Do the K-th of N parts of the contents (dealt round-robin, K from 1): give each machine of a job array its part, with the same inputs and --output.", show_default=False)] = None,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images above this many pixels (PIL's bomb guard, raised deliberately).")] = DEFAULT_MAX_PIXELS,
    depth: Annotated[int, typer.Option(help="Bits per output sample: 8, or 16 for png/tiff (a 16-bit input keeps its precision only with 16).")] = 8,
    tile: Annotated[str, typer.Option(help="Tile core side in pixels, or 'auto' to fit --max-memory. Tiled output equals the whole-image result.")] = "auto",
    no_tile: Annotated[bool, typer.Option("--no-tile", help="Run each stage on the whole image at once (the reference path; memory grows with the image).")] = False,
    max_memory: Annotated[str, typer.Option(help="Memory budget, e.g. 512MB, 2GB (binary: 1GB = 1 GiB = 1024^3 bytes). On the CPU: RAM above the baseline (interpreter, libraries, model: see ultrastyle doctor), a quarter for images being read and written, the rest for tiles and canvases. With --device cuda: GPU memory (tiles, and PyTorch's canvases up to half).")] = DEFAULT_BUDGET,
    halo: Annotated[str, typer.Option(help="'exact' (the full receptive field: exact result) or a smaller halo in pixels (faster, approximate).")] = "exact",
    scratch: Annotated[Path | None, typer.Option(exists=True, file_okay=False, writable=True, help="Folder for disk-backed canvases of images too large for RAM (default: system temp).")] = None,
    mix: Annotated[list[str] | None, typer.Option("--mix", help="STYLE=WEIGHT; repeat to blend several styles into one output (weights are normalised). Instead of --style.", show_default=False)] = None,
    mask: Annotated[Path | None, typer.Option(help="Label image the content's size: one region per colour, taking the --style images in ascending order of colour; one output per content, {content}_stylized_{a}+{b}_mask-{mask}.", show_default=False)] = None,
    preserve_color: Annotated[PreserveColor, typer.Option(case_sensitive=False, help="luminance: keep the content's colours (chroma) under the stylized luminance; match: recolour the style to the content's palette first.")] = PreserveColor.none,
    io_workers: Annotated[int, typer.Option(min=0, help="Threads decoding the next contents and encoding finished outputs while the model computes (0: half the cores, between 1 and 8; at most 4 per core).")] = 0,
    png_level: Annotated[int, typer.Option(min=0, max=9, help="zlib level of PNG outputs: 1 is fast; 6-9 write files ~10-20% smaller, several times slower.")] = DEFAULT_PNG_LEVEL,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS|local", help="Run on Ray (the ray extra): 'local' starts Ray on this machine alone (bound to 127.0.0.1); HOST:PORT joins a running cluster, whose nodes must all see the model, inputs and --output at the same paths. One actor per CPU (--workers), each content on one actor.", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="With --ray: Ray actors, each with a model and its own --max-memory (default: one per CPU of the cluster; per GPU with --device cuda)", show_default=False)] = None,
    distribute_tiles: Annotated[bool, typer.Option("--distribute-tiles", help="With --ray: spread each image's tiles over every worker, one image after the other (for images too large or slow for one machine); the result equals the local one.")] = False,
) -> None:
    """Stylize every CONTENT image with every --style image (WCT or AdaIN cascade).

    ultrastyle stylize photos/ --style art.jpg -o out/   or   ultrastyle stylize photos/ art.jpg -o out/

    Exit status is 1 if any pair failed; the other pairs still run and no
    partial output file is left behind. Ctrl-C drops the image being computed,
    finishes the outputs being written (--ray: drops them too), prints the
    summary and exits 130.
    """
    # The library is imported here, not at module level: every `--help` builds this command (typer), without torch.
    from ultrastyle.api import ClusterStylizer, OptionError, Stylizer, check_distributed, make_options
    from ultrastyle.distributed.cluster import ClusterError
    from ultrastyle.errors import RunnerError
    from ultrastyle.export.bundle import BundleError
    from ultrastyle.export.errors import ExportValidationError
    from ultrastyle.io.images import ImageError, as_role, check_pixels, read_image
    from ultrastyle.io.paths import expand_inputs
    from ultrastyle.io.sources import image_header
    from ultrastyle.models.convert import CheckpointError
    from ultrastyle.models.sources import model_defaults
    from ultrastyle.options import model_path, no_empty_path, output_folder
    from ultrastyle.runtime.batch import output_megapixels
    from ultrastyle.runtime.pairs import BatchInterrupted, OutputCollisionError, Pair, PairResult

    given = given_flags(ctx)
    if no_tile and (clash := [flag for name, flag in _TILING_FLAGS.items() if name in given]):
        raise typer.BadParameter(f"--no-tile runs each stage on the whole image, which {clash[0]} would tile; give one of them",
                                 param_hint=clash[0])  # fmt: skip
    for said in _unused_flags(given, fmt.value):
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: {said}", style="yellow", markup=False)
    try:
        model_path(model)
    except OptionError as exc:
        raise _bad_option(exc) from None
    try:  # unset --method/--levels/--alpha come from the model (zoo entry, folder or bundle)
        defaults = model_defaults(model)
    except (zoo.ZooError, OSError, ValueError) as exc:
        _err(" ".join(as_command(exc, flags=_FLAGS).split()))
        raise typer.Exit(2) from None
    settings = dict(
        method=method.value if method is not None else None, alpha=alpha, levels=levels,
        preserve_color=preserve_color.value, content_size=content_size, style_size=style_size,
        max_memory=None if no_tile else max_memory, tile=tile, halo=halo, scratch=scratch, format=fmt.value,
        depth=depth, png_level=png_level, skip_existing=skip_existing, shard=shard, max_pixels=max_pixels, io_workers=io_workers,
        tiff_layout=tiff_layout.value, tiff_compression=tiff_compression.value, dzi_tiles=dzi_tiles.value,
        streaming=streaming.value, metadata=metadata.value,
    )  # fmt: skip
    try:
        options = make_options(defaults, **settings)  # every bad value, before the model is opened
    except OptionError as exc:
        raise _bad_option(exc) from None
    if backend is not Backend.tensorrt and ray is None:  # TensorRT needs no CUDA build of PyTorch; the workers of a Ray
        params.require_cuda(device)  # cluster run on its GPU nodes (the pool says when it has none)
    try:
        no_empty_path("contents", content)
        no_empty_path("styles", style or [])
    except OptionError as exc:
        raise _bad_option(exc) from None
    if mix:
        if style:
            raise typer.BadParameter("give either --style (one output per style) or --mix (one blended output)", param_hint="--mix")
        if mask is not None:
            raise typer.BadParameter("--mask takes one --style per label, not a --mix", param_hint="--mix")
        mix_items, contents, styles = _mix_items(mix), expand_inputs(content), []
    else:
        if not style:
            # `ultrastyle stylize CONTENT... STYLE`, like cp's SOURCE... DEST.
            if len(content) < 2:
                raise typer.BadParameter("give a style image with --style, or as the last argument", param_hint="--style")
            content, style = content[:-1], content[-1:]
        mix_items, contents, styles = None, expand_inputs(content), expand_inputs(style, unique=mask is None)  # a mask's labels may share a style
    try:  # before the model opens: a file there would fail every output after all the compute
        output = output_folder("output_dir", output)  # a str until here: typer would make "" the current folder
    except OptionError as exc:
        raise _bad_option(exc) from None
    if not contents or (not styles and not mix_items):
        _err(f"no {'content' if not contents else 'style'} images found in: {' '.join(content if not contents else style)}")
        raise typer.Exit(2)
    # Files that are nowhere and would fail every pair: refused before the model opens, as optimize refuses its style.
    for role, files, every in (("content", contents, True), ("style", [p for p, _ in mix_items] if mix_items else styles, not (mix or mask))):
        gone = [p for p in files if not p.exists()]
        if gone and (len(gone) == len(files) or not every):  # every one missing, or one of a mix's (or a mask's) styles
            more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
            _err(f"{gone[0]}: no such {role} image file{more}; every output would fail on it")
            raise typer.Exit(2)
        if role == "style" and (len(files) == 1 or not every):  # and styles that are no image, or too large: from their headers
            for p in files:
                try:
                    if not p.is_file() or (header := image_header(p)) is None:  # a pipe's header read would consume it
                        read_image(p, max_pixels=options.max_pixels)  # raises, saying why
                    else:
                        check_pixels(p, header[0], header[1], options.max_pixels)
                except ImageError as exc:
                    _err(f"{as_command(as_role('style', exc), flags=_FLAGS)}; every output would fail on it")
                    raise typer.Exit(2) from None
    if options.shard is not None and options.shard[0] > len(contents):  # the library deals what it plans, fewer still
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"part {options.shard[0]}/{options.shard[1]}: none of the "
                                                                    f"{len(contents)} contents; nothing to do")  # fmt: skip
        return
    if mask is not None:  # its size and label count, before the model opens (a download, an export)
        from ultrastyle.io.images import ImageError
        from ultrastyle.io.masks import check_label_count, check_mask_size, read_labels

        try:
            check_mask_size(mask, contents)
            check_label_count(mask, read_labels(mask, max_pixels=options.max_pixels)[1], len(styles))
        except ImageError as exc:
            _err(as_command(exc, flags=_FLAGS))
            raise typer.Exit(2) from None
    if options.resolved_tiling.max_memory is not None and backend.value == "torch" and device == "cpu":
        use_huge_pages()  # before the first tensor: eager tiles re-fault trimmed pages 2 MB at a time
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if distribute_tiles and ray is None:
        raise typer.BadParameter("spreads an image over a Ray cluster: give --ray ADDRESS or --ray local too", param_hint="--distribute-tiles")
    if ray is not None and not ray.strip():
        raise typer.BadParameter("an empty address; give HOST:PORT of a running cluster, or local", param_hint="--ray")
    if workers is not None and ray is None:
        raise typer.BadParameter("sizes the pool of Ray workers: give --ray ADDRESS or --ray local too", param_hint="--workers")
    try:
        check_distributed(distribute_tiles, mask is not None)
    except OptionError as exc:
        raise _bad_option(exc) from None
    t_open = time.perf_counter()
    try:
        opener = Stylizer if ray is None else partial(ClusterStylizer, address=ray, distribute_tiles=distribute_tiles, workers=workers)
        stylizer = opener(
            model, backend=backend.value, device=device, precision=precision.value, threads=threads, compile=compile_,
            levels=options.levels, on_message=lambda msg: console.print(msg, markup=False), progress=not quiet,
        )  # fmt: skip
    except (zoo.ZooError, CheckpointError, BundleError, RunnerError, ExportValidationError, OSError, ClusterError) as exc:
        text = as_command(exc, flags=_FLAGS)
        _err(" ".join(text.split()) if isinstance(exc, zoo.ZooError) else text)
        raise typer.Exit(2) from None
    except OptionError as exc:  # levels the model lacks
        raise _bad_option(exc) from None
    except KeyboardInterrupt:
        _err("interrupted while opening the model; no image was stylized")
        raise typer.Exit(130) from None
    opened = f"; model {'and Ray pool ' if ray is not None else ''}opened in {time.perf_counter() - t_open:.1f} s"  # not in the batch's time
    lines = LogLines(console, quiet=quiet)
    with stylizer, Progress(
        *_bar_columns(console.width), console=console, transient=False, disable=not lines.bar,  # a log gets plain lines
    ) as progress:
        reported: set[str] = set()  # a bad file fails every pair it is in; say so once
        sizes: dict[object, float] = {}  # megapixels of each content that runs (headers only): the bar counts them
        task = progress.add_task("", total=None)
        tiles = progress.add_task("", total=None, visible=False, unit="tiles")
        counted = {"pairs": 0, "finished": 0}

        def on_plan(pairs: list[Pair]) -> None:  # what runs (this part's; the batch's own earlier outputs left out)
            sizes.update((c, output_megapixels(c, options)) for c in dict.fromkeys(p.content for p in pairs))
            progress.update(task, total=sum(sizes[p.content] for p in pairs) or None)
            counted["pairs"] = len(pairs)
            if options.shard is not None:
                k, n = options.shard
                progress.console.print(f"part {k}/{n}: {len({p.content for p in pairs})} contents, {len(pairs)} pairs")

        def on_tile(what: str, done: int, total: int) -> None:
            progress.update(tiles, description=f"  {what}", completed=done, total=total, visible=total > 1)
            lines.say(f"  {what}: tile {done}/{total}")

        def on_result(r: PairResult) -> None:
            if r.status == "failed" and r.error not in reported:
                reported.add(r.error or "")
                progress.console.print(f"error: {swap(r.error or '', r.remedy, _FLAGS)}", style="red", markup=False, soft_wrap=True)
            name = r.pair.output.name if r.pair.output else ""
            progress.update(task, advance=sizes.get(r.pair.content, 0.0), description=name)
            progress.update(tiles, visible=False)
            counted["finished"] += 1
            t = progress.tasks[task]
            lines.say(f"[{counted['finished']}/{counted['pairs'] or '?'}] {name} {r.status}; {_mp(t.completed)}/{_mp(t.total)} MP "
                      f"in {t.elapsed or 0:.1f} s", milestone=True)  # fmt: skip

        try:
            with warnings.catch_warnings():  # the library's notices (a file read whole, an animation's first frame)
                warnings.showwarning = warning_lines(progress.console)
                summary = stylizer.stylize_batch(
                    contents, styles or None, output, mix=mix_items, mask=mask, on_result=on_result, on_tile=on_tile, on_plan=on_plan,
                    **settings
                )  # fmt: skip
            progress.update(task, completed=progress.tasks[task].total)  # contents left out (earlier outputs) planned no work
        except OptionError as exc:
            _drop(progress)
            raise _bad_option(exc) from None
        except (OutputCollisionError, ImageError) as exc:  # before any work: colliding outputs, a mask of the wrong label count
            _drop(progress)
            _err(as_command(exc, flags=_FLAGS))
            raise typer.Exit(2) from None
        except BatchInterrupted as exc:
            progress.stop()
            done, skipped = exc.summary.count("done"), exc.summary.count("skipped")
            if exc.abandoned:  # a Ray pool kills its busy actors
                said = "the images being computed or written were dropped"
            else:
                said = "the image being computed was dropped" + (" and the outputs already being written were finished" if done else "")
            kept = done + skipped  # a resumed run's outputs are kept by the next one too
            again = f"rerun with --skip-existing to resume (the {kept} written are kept)" if kept else "rerun to start again"
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"interrupted: {said} (nothing partial is left); {again}")
            Console(highlight=False, soft_wrap=True).print(f"{exc.summary.describe()}{opened}; {where_outputs(output, done, skipped)}")
            raise typer.Exit(130) from None
        except KeyboardInterrupt:  # before the batch began, or a second Ctrl-C while the outputs in flight were being finished
            progress.stop()
            _err("interrupted before the summary: each output is written whole or not at all; rerun with --skip-existing to resume")
            raise typer.Exit(130) from None
        progress.remove_task(tiles)
    where = where_outputs(output, summary.count("done"), summary.count("skipped"))
    Console(highlight=False, soft_wrap=True).print(f"{summary.describe()}{opened}; {where}")
    if summary.count("failed"):
        raise typer.Exit(1)
