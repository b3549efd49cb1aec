"""`ultrastyle stylize`: batch style transfer over files, folders and globs."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ultrastyle.io.images import DEFAULT_MAX_PIXELS
from ultrastyle.io.paths import expand_inputs
from ultrastyle.models import zoo
from ultrastyle.models.convert import CheckpointError
from ultrastyle.export.bundle import BundleError
from ultrastyle.export.validate import ExportValidationError
from ultrastyle.models.pretrained import DEFAULT_MODEL
from ultrastyle.runtime.backends.base import RunnerError
from ultrastyle.runtime.backends.select import open_runner
from ultrastyle.io.images import ImageError
from ultrastyle.io.masks import check_label_count, read_labels
from ultrastyle.runtime.batch import OutputCollisionError, PairResult, StyleSpec, StylizeOptions, plan_pairs, run_batch
from ultrastyle.models.defaults import model_defaults
from ultrastyle.runtime.cascade import parse_levels
from ultrastyle.runtime.memory import parse_bytes, use_huge_pages
from ultrastyle.runtime.tiled import TilingOptions, plan_stage


class Method(str, Enum):
    wct = "wct"
    adain = "adain"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class PreserveColor(str, Enum):
    none = "none"
    luminance = "luminance"
    match = "match"


class Format(str, Enum):
    png = "png"
    jpg = "jpg"
    tiff = "tiff"


def _tiling_options(tile: str, max_memory: str, halo: str, scratch: Path | None) -> TilingOptions:
    try:
        budget = parse_bytes(max_memory)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--max-memory") from None
    if tile != "auto" and not (tile.isdigit() and int(tile) > 0):
        raise typer.BadParameter(f"expected 'auto' or a positive number of pixels, got {tile!r}", param_hint="--tile")
    if halo != "exact" and not halo.isdigit():
        raise typer.BadParameter(f"expected 'exact' or a number of pixels, got {halo!r}", param_hint="--halo")
    return TilingOptions(
        tile=None if tile == "auto" else int(tile),
        max_memory=budget,
        halo=None if halo == "exact" else int(halo),
        scratch_dir=scratch,
    )


def _mix_spec(items: list[str]) -> StyleSpec:
    """``["a.jpg=0.7", "b.jpg=0.3"]`` -> a normalised StyleSpec mix; one clear error per bad item."""
    paths, weights = [], []
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
            raise typer.BadParameter(f"{name}: no such style image file", param_hint="--mix")
        if path in paths:
            raise typer.BadParameter(f"{name} is given twice; give each style once with its weight", param_hint="--mix")
        paths.append(path)
    try:
        return StyleSpec(tuple(paths), tuple(weights))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mix") from None


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)


def stylize_command(
    content: Annotated[list[str], typer.Argument(help="Content images: files, folders or globs (quote globs). Without --style, the last one is the style.", show_default=False)],
    style: Annotated[list[str] | None, typer.Option("--style", "-s", help="Style image(s): file, folder or glob; repeat for more. Every content x style pair is made.", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder; files are named {content}_stylized_{style}.{ext}.")] = Path("out"),
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name (installed on first use), a folder of CD weights {k}SE.pth/{k}SD.pth, a pytorch-AdaIN folder (vgg_normalised.pth + decoder.pth), or a bundle folder (ultrastyle export).")] = DEFAULT_MODEL,
    method: Annotated[Method | None, typer.Option(help="Feature transform [default: the model's, wct for the CD models]", show_default=False)] = None,
    alpha: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Style strength: alpha*transformed + (1-alpha)*content features [default: the model's, 0.6 for the CD models]", show_default=False)] = None,
    levels: Annotated[str | None, typer.Option(help="Stages to run, in order (coarse to fine) [default: the model's, 5,4,3,2,1 for the CD models]", show_default=False)] = None,
    content_size: Annotated[int, typer.Option(min=0, help="Resize contents so the long side is this many pixels; 0 keeps the size.")] = 0,
    style_size: Annotated[int, typer.Option(min=0, help="Resize styles so the long side is this many pixels; 0 keeps the size.")] = 1024,
    device: Annotated[Device, typer.Option(help="Where the networks run.")] = Device.cpu,
    backend: Annotated[Backend, typer.Option(help="auto: TensorRT where this GPU has fresh engines (ultrastyle build), else ONNX Runtime; tensorrt: builds missing engines on first use; torch: the PyTorch reference.")] = Backend.auto,
    precision: Annotated[Precision, typer.Option(help="fp32; int8 (the Q/DQ graphs from ultrastyle calibrate) on onnxruntime and tensorrt; fp16 on tensorrt.")] = Precision.fp32,
    threads: Annotated[int, typer.Option(min=0, help="Threads per network (0: one per physical core).")] = 0,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output image format (jpg at quality 95).")] = Format.png,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip pairs whose output exists (resume an interrupted batch).")] = False,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images above this many pixels (PIL's bomb guard, raised deliberately).")] = DEFAULT_MAX_PIXELS,
    depth: Annotated[int, typer.Option(help="Bits per output sample: 8, or 16 for png/tiff (16-bit inputs keep their precision).")] = 8,
    tile: Annotated[str, typer.Option(help="Tile core side in pixels, or 'auto' to fit --max-memory. Tiled output equals the whole-image result.")] = "auto",
    no_tile: Annotated[bool, typer.Option("--no-tile", help="Run each stage on the whole image at once (the reference path; memory grows with the image).")] = False,
    max_memory: Annotated[str, typer.Option(help="Memory budget per image, e.g. 512MB, 2GB: RAM on the CPU (tiles, and canvases up to a quarter), GPU memory with --device cuda (tiles, and PyTorch's canvases up to half).")] = "2GB",
    halo: Annotated[str, typer.Option(help="'exact' (the full receptive field: exact result) or a smaller halo in pixels (faster, approximate).")] = "exact",
    scratch: Annotated[Path | None, typer.Option(exists=True, file_okay=False, writable=True, help="Folder for disk-backed canvases of images too large for RAM (default: system temp).")] = None,
    mix: Annotated[list[str] | None, typer.Option("--mix", help="STYLE=WEIGHT; repeat to blend several styles into one output (weights are normalised). Instead of --style.", show_default=False)] = None,
    mask: Annotated[Path | None, typer.Option(help="Label image the content's size: one region per colour, taking the --style images in ascending order of colour; one output per content.", show_default=False)] = None,
    preserve_color: Annotated[PreserveColor, typer.Option(help="luminance: keep the content's colours (chroma) under the stylized luminance; match: recolour the style to the content's palette first.")] = PreserveColor.none,
) -> None:
    """Stylize every CONTENT image with every --style image (WCT or AdaIN cascade).

    ultrastyle stylize photos/ --style art.jpg -o out/   or   ultrastyle stylize photos/ art.jpg -o out/

    Exit status is 1 if any pair failed; the other pairs still run and no
    partial output file is left behind.
    """
    try:  # unset --method/--levels/--alpha come from the model (zoo entry, folder or bundle)
        defaults = model_defaults(model)
    except (zoo.ZooError, OSError, ValueError) as exc:
        _err(" ".join(str(exc).split()))
        raise typer.Exit(2) from None
    try:
        level_tuple = parse_levels(levels) if levels is not None else defaults.levels
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--levels") from None
    method_name = method.value if method is not None else defaults.method
    alpha = alpha if alpha is not None else defaults.alpha
    if device is Device.cuda and backend is not Backend.tensorrt:  # TensorRT needs no CUDA build of PyTorch
        import torch

        if not torch.cuda.is_available():
            _err("--device cuda: no CUDA device is available to PyTorch here; use --device cpu")
            raise typer.Exit(2)
    if mix:
        if style:
            raise typer.BadParameter("give either --style (one output per style) or --mix (one blended output)", param_hint="--mix")
        if mask is not None:
            raise typer.BadParameter("--mask takes one --style per label, not a --mix", param_hint="--mix")
        contents, specs = expand_inputs(content), [_mix_spec(mix)]
        style = []
    else:
        if not style:
            # `ultrastyle stylize CONTENT... STYLE`, like cp's SOURCE... DEST.
            if len(content) < 2:
                raise typer.BadParameter("give a style image with --style, or as the last argument", param_hint="--style")
            content, style = content[:-1], content[-1:]
        contents, styles = expand_inputs(content), expand_inputs(style)
        specs = [StyleSpec(tuple(styles), mask=mask)] if mask is not None and styles else styles
    if not contents or not specs:
        _err(f"no {'content' if not contents else 'style'} images found in: {' '.join(content if not contents else style)}")
        raise typer.Exit(2)
    if mask is not None:
        try:  # the label count is known before any work
            check_label_count(mask, read_labels(mask, max_pixels=max_pixels)[1], len(styles))
        except ImageError as exc:
            _err(str(exc))
            raise typer.Exit(2) from None
    if depth not in (8, 16) or (depth == 16 and fmt is Format.jpg):
        raise typer.BadParameter("use 8, or 16 with --format png or tiff", param_hint="--depth")
    tiling = None if no_tile else _tiling_options(tile, max_memory, halo, scratch)
    if tiling is not None and backend.value == "torch" and device.value == "cpu":
        use_huge_pages()  # before the first tensor: eager tiles re-fault trimmed pages 2 MB at a time
    options = StylizeOptions(
        method=method_name, alpha=alpha, levels=level_tuple, content_size=content_size,
        style_size=style_size, format=fmt.value, skip_existing=skip_existing, max_pixels=max_pixels,
        depth=depth, tiling=tiling, preserve_color=preserve_color.value,
    )  # fmt: skip
    console = Console(stderr=True, highlight=False)
    try:
        net = open_runner(
            model, backend=backend.value, device=device.value, stages=tuple(sorted(set(level_tuple))),
            threads=threads, on_export=lambda msg: console.print(msg, markup=False), precision=precision.value,
        )  # fmt: skip
    except (zoo.ZooError, CheckpointError, BundleError, RunnerError, ExportValidationError, OSError) as exc:
        _err(" ".join(str(exc).split()) if isinstance(exc, zoo.ZooError) else str(exc))
        raise typer.Exit(2) from None
    if tiling is not None and tiling.tile is None:
        try:  # fail before any work when the budget cannot hold one tile of some stage
            for k in level_tuple:
                plan_stage(net.arch, k, 4096, 4096, tiling, net.memory_factor(k))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--max-memory") from None
    if tiling is not None and net.backend == "tensorrt":
        try:  # one tile for every level that fits the engines' profiles; an explicit --tile that cannot fails here, before any work
            tiling = net.fit_tiling(tiling, level_tuple)
        except (ValueError, RunnerError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--tile") from None
        options = replace(options, tiling=tiling)

    try:
        pairs = plan_pairs(contents, specs, output, fmt.value)
    except OutputCollisionError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    with net, Progress(
        TextColumn("[bold]stylize"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
    ) as progress:  # fmt: skip
        task = progress.add_task("", total=len(pairs))
        tiles = progress.add_task("", total=None, visible=False)

        def on_tile(what: str, done: int, total: int) -> None:
            progress.update(tiles, description=f"  {what}", completed=done, total=total, visible=total > 1)
        reported: set[str] = set()  # a bad file fails every pair it is in; say so once

        def on_result(r: PairResult) -> None:
            if r.status == "failed" and r.error not in reported:
                reported.add(r.error or "")
                progress.console.print(f"error: {r.error}", style="red", markup=False, soft_wrap=True)
            progress.update(task, advance=1, description=r.pair.output.name)
            progress.update(tiles, visible=False)

        summary = run_batch(net, pairs, options, on_result, on_tile)
        progress.remove_task(tiles)

    spmp = summary.seconds_per_megapixel
    rate = f", {spmp:.2f} s/MP" if spmp is not None else ""
    Console(highlight=False).print(
        f"{summary.count('done')} done, {summary.count('skipped')} skipped, {summary.count('failed')} failed "
        f"of {len(pairs)} pairs{rate}; outputs in {output}"
    )
    if summary.count("failed"):
        raise typer.Exit(1)
