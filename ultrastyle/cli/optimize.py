"""`ultrastyle optimize`: optimization-based stylization (Gatys et al.) of every content with one style (a thin layer over `ultrastyle.optimization`)."""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ultrastyle.cli import params
from ultrastyle.cli.logs import LogLines, warning_lines, where_outputs
from ultrastyle.cli.remedies import as_command, bad_parameter, flag_name, given_flags, swap
from ultrastyle.io.constants import DEFAULT_MAX_PIXELS
from ultrastyle.models.defaults import DEFAULT_MODEL
from ultrastyle.optimization.constants import (
    DEFAULT_CONTENT_LAYER,
    DEFAULT_CONTENT_WEIGHT,
    DEFAULT_ITERATIONS,
    DEFAULT_MAX_MEMORY,
    DEFAULT_SAVE_EVERY,
    DEFAULT_SOLVER,
    DEFAULT_STYLE_WEIGHT,
    FORMATS,
    SOLVERS,
)

if TYPE_CHECKING:
    from ultrastyle.runtime.pairs import BatchSummary


class Init(str, Enum):
    content = "content"
    noise = "noise"
    wct = "wct"


SolverName = Enum("SolverName", {s: s for s in SOLVERS}, type=str)


class Format(str, Enum):
    png = "png"
    jpg = "jpg"
    tiff = "tiff"
    jpeg = "jpeg"  # the aliases the library takes too (io.constants.format_name)
    tif = "tif"


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)


def _format(output: Path | None, given: Format | None) -> str:
    """The output format: ``given``, which must agree with an output file's suffix, else that suffix, else png."""
    from ultrastyle.options import OptionError, output_format

    if output is None:
        return given.value if given else "png"
    try:
        fmt = output_format(output, given.value if given else None, FORMATS)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    if fmt not in [f.value for f in Format]:  # normalised by output_format: JPG, jpeg -> jpg
        raise typer.BadParameter(f"{output}: optimize writes png, jpg or tiff, not {fmt}", param_hint="--output")
    return fmt


def _layer_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"expected five numbers for relu1_1..relu5_1, e.g. 1,1,1,1,1; got {text!r}", param_hint="--layer-weights") from None


def optimize_command(
    ctx: typer.Context,
    content: Annotated[list[str], typer.Argument(metavar="CONTENT", help="Content images: files, folders or globs (quote globs). Without --style, the last one is the style.", show_default=False)],
    style: Annotated[Path | None, typer.Option("--style", "-s", help="The style image.", show_default=False)] = None,
    output: Annotated[str, typer.Option("--output", "-o", metavar="PATH", help="Output folder ({content}_optimized_{style}.{ext}), or a file name for one content.")] = "out",
    iterations: Annotated[int, typer.Option(min=0, help="Solver iterations per scale.")] = DEFAULT_ITERATIONS,
    scales: Annotated[str, typer.Option(help="Long sides to optimize at, coarse to fine, each starting from the previous result upsampled, e.g. 512,1024,full.")] = "full",
    init: Annotated[Init, typer.Option(case_sensitive=False, help="Starting image at the first scale: the content, uniform noise (--seed), or ultrastyle stylize's result (wct: the model's own method, AdaIN for an AdaIN model).")] = Init.content,
    solver: Annotated[SolverName, typer.Option(case_sensitive=False, help="lbfgs (fewer evaluations to a given loss, measured) or adam.")] = SolverName(DEFAULT_SOLVER),
    content_weight: Annotated[float, typer.Option(help="alpha: weight of the content loss (per feature position at --content-layer).")] = DEFAULT_CONTENT_WEIGHT,
    style_weight: Annotated[float, typer.Option(help="beta: weight of the style (Gram) loss summed over relu1_1..relu5_1.")] = DEFAULT_STYLE_WEIGHT,
    layer_weights: Annotated[str | None, typer.Option(help="lambda per style layer relu1_1..relu5_1, five numbers (default: 1 each).", show_default=False)] = None,
    content_layer: Annotated[str, typer.Option(help="Layer of the content loss: relu1_1 .. relu5_1.")] = DEFAULT_CONTENT_LAYER,
    content_size: Annotated[int, typer.Option(min=0, help="Resize contents so the long side is this many pixels; 0 keeps the size.")] = 0,
    style_size: Annotated[int | None, typer.Option(min=0, help="Long side of the style; 0 keeps its own size (default: each scale's long side, at most the style's own).", show_default=False)] = None,
    max_memory: Annotated[str, typer.Option(help="Memory budget per image, e.g. 1GB (binary: 1 GiB): tiles get what the canvases (in RAM up to a quarter of it, else on disk) leave.")] = DEFAULT_MAX_MEMORY,
    no_tile: Annotated[bool, typer.Option("--no-tile", help="Evaluate the whole image at once (memory grows with the image; same result).")] = False,
    tile: Annotated[int | None, typer.Option(min=1, help="Fixed tile core side in pixels instead of fitting --max-memory.", show_default=False)] = None,
    scratch: Annotated[Path | None, typer.Option(exists=True, file_okay=False, writable=True, help="Folder for disk canvases (default: system temp).")] = None,
    save_every: Annotated[int, typer.Option(min=0, help="Save the state every K iterations (and after each scale); a rerun of the same command resumes from it. 0: only after each scale.")] = DEFAULT_SAVE_EVERY,
    seed: Annotated[int, typer.Option(help="Seed of --init noise.")] = 0,
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model name or folder of CD weights: its deepest encoder is the loss network (WCT init uses the whole model).")] = DEFAULT_MODEL,
    device: Annotated[str, typer.Option(metavar=params.DEVICE_METAVAR, parser=params.device, help="Where the loss network runs: the CPU, or a CUDA GPU (cuda:N: the N-th).")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="PyTorch threads (0: PyTorch's default).")] = 0,
    fmt: Annotated[Format | None, typer.Option("--format", "-f", help="Output format (default: an output file's suffix, else png).", show_default=False, case_sensitive=False)] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Skip contents whose output exists, unless an interrupted run of it saved a state: that is resumed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (in a log: no progress lines); warnings, errors and the summary still print.")] = False,
    shard: Annotated[str | None, typer.Option("--shard", metavar="K/N", help="Do the K-th of N parts of the contents (dealt round-robin, K from 1): give each machine of a job array its part, with the same inputs and --output.", show_default=False)] = None,
    metadata: Annotated[params.Metadata, typer.Option(case_sensitive=False, help=params.METADATA_HELP)] = params.Metadata.keep,
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse images above this many pixels (PIL's bomb guard, raised deliberately).")] = DEFAULT_MAX_PIXELS,
) -> None:
    """Stylize every CONTENT image with --style by optimizing the image (Gatys et al.), tile by tile within --max-memory.

    The gradient of every tile is exact: tiled and whole-image runs take the
    same steps. Interrupted runs resume from their last saved state when the
    same command is run again. Exit status is 1 if any content failed; the
    others still run.
    """
    from ultrastyle.core.plan import size_text
    from ultrastyle.io.images import ImageError
    from ultrastyle.optimization.batch import check_budget, check_style, is_file_output, plan_outputs, run_batch, state_dir_for
    from ultrastyle.optimization.run import Optimizer, ProgressEvent, make_optimize_options
    from ultrastyle.options import OptionError
    from ultrastyle.options import shard as check_shard
    from ultrastyle.runtime.pairs import BatchInterrupted, Pair, PairResult, deal

    if style is None:  # `ultrastyle optimize CONTENT... STYLE`, as stylize takes it
        if len(content) < 2:
            raise typer.BadParameter("give a style image with --style, or as the last argument", param_hint="--style")
        content, style = content[:-1], Path(content[-1])
    as_file = is_file_output(output)
    out_format = _format(output if as_file else None, fmt)
    if no_tile and (clash := [f"--{n.replace('_', '-')}" for n in ("tile", "max_memory", "scratch") if n in given_flags(ctx)]):
        raise typer.BadParameter(f"--no-tile evaluates whole images, which {clash[0]} would tile or place; give one of them", param_hint=clash[0])
    if "seed" in given_flags(ctx) and init is not Init.noise:  # as stylize says of a flag its run leaves out
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: --seed seeds --init noise; this run starts from the "
                                                                    f"{init.value}: left out", style="yellow", markup=False)  # fmt: skip
    settings = dict(
        iterations=iterations, scales=scales, init=init.value, solver=solver.value, content_weight=content_weight,
        style_weight=style_weight, layer_weights=_layer_weights(layer_weights), content_layer=content_layer,
        content_size=content_size, style_size=style_size, max_memory=None if no_tile else max_memory, tile=tile,
        scratch=scratch, save_every=save_every, seed=seed, format=out_format, max_pixels=max_pixels, metadata=metadata.value,
    )  # fmt: skip
    try:
        opts, part = make_optimize_options(**settings), check_shard("shard", shard)
        planned = plan_outputs(content, style, output, opts.format)
    except OptionError as exc:
        if exc.option in ("contents", "style"):  # nothing to read, or outputs that would collide
            _err(as_command(exc, exc.message))
            raise typer.Exit(2) from None
        raise bad_parameter(exc) from None
    pairs = deal(planned, part)
    if part is not None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"part {part[0]}/{part[1]}: {len(pairs)} of the {len(planned)} contents"
                                                                    + ("; nothing to do" if not pairs else ""))  # fmt: skip
        if not pairs:
            return
    try:
        check_style(style, opts.max_pixels, pairs, skip_existing)  # one error for the batch, before the model opens
    except ImageError as exc:
        _err(as_command(exc))
        raise typer.Exit(2) from None
    params.require_cuda(device)
    try:
        optimizer = Optimizer(model, device=device, threads=threads, progress=not quiet)
    except OptionError as exc:  # --threads beyond the cores
        raise bad_parameter(exc) from None
    except Exception as exc:  # noqa: BLE001 - a bad model: one line, exit 2
        _err(" ".join(as_command(exc).split()))
        raise typer.Exit(2) from None
    try:
        with warnings.catch_warnings(record=True) as noted:
            warnings.simplefilter("always")
            optimizer.check(opts)  # before any image: layers the model's loss network lacks
        for w in noted:
            Console(stderr=True, highlight=False, soft_wrap=True).print(f"warning: {w.message}", style="yellow", markup=False)
        check_budget(optimizer, opts, pairs)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    lines = LogLines(console, quiet=quiet)
    with optimizer, Progress(
        TextColumn("{task.fields[name]}"), BarColumn(bar_width=20), MofNCompleteColumn(),
        TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
        disable=not lines.bar,  # a log gets plain lines (`on_progress`)
    ) as progress:  # fmt: skip
        tasks: dict[Path, int] = {}

        def on_progress(pair: Pair, e: ProgressEvent) -> None:
            if pair.output not in tasks:
                tasks[pair.output] = progress.add_task("", total=e.scales * opts.iterations or None, name=pair.output.name)
            v = e.value
            text = (f"scale {e.scale + 1}/{e.scales} {e.size[1]}x{e.size[0]} loss {v.total:.4g} "
                    f"(content {opts.content_weight * v.content:.3g}, style {v.total - opts.content_weight * v.content:.3g}) "
                    f"{e.tiles} tile(s)")  # fmt: skip
            progress.update(tasks[pair.output], completed=e.scale * opts.iterations + e.iteration, total=e.scales * opts.iterations,
                            description=text)  # fmt: skip
            lines.say(f"{pair.output.name}: iteration {e.iteration}/{e.iterations} {text}", milestone=e.iteration >= e.iterations)

        def on_result(r: PairResult) -> None:
            if r.status == "failed":
                text = r.error or ""
                if r.option:  # "CONTENT: max_memory: ..." names the flag
                    text = text.replace(f": {r.option}: ", f": {flag_name(r.option)}: ", 1)
                progress.console.print(f"error: {swap(text, r.remedy)}", style="red", markup=False, soft_wrap=True)
                if r.pair.output in tasks:  # a finished image keeps its line (the final losses), a failed one goes
                    progress.update(tasks[r.pair.output], visible=False)

        try:
            with warnings.catch_warnings():  # the library's notices (a saved state that is not resumed)
                warnings.showwarning = warning_lines(progress.console)
                summary = run_batch(optimizer, pairs, opts, skip_existing=skip_existing, on_progress=on_progress, on_result=on_result)
        except BatchInterrupted as stop:
            progress.stop()
            again = "run the same command again" + ("" if skip_existing else " with --skip-existing (the finished images are not redone)")
            for pair in stop.unfinished:
                state = state_dir_for(pair.output)
                if optimizer.resumes(pair.content, pair.style.paths[0], opts, state):  # where and how big: it is hidden
                    held = size_text(sum(f.stat().st_size for f in state.rglob("*") if f.is_file()))
                    resume = f"{again} to resume it from its last saved state ({state.absolute()}, {held}; delete it to start over)"
                else:
                    resume = f"no state of this run was saved yet (--save-every K saves one every K iterations); {again} to start it again"
                console.print(f"interrupted: {pair.output.name} was not finished; {resume}", markup=False)
            _summary(stop.summary, len(pairs), output, as_file)
            raise typer.Exit(130) from None
    _summary(summary, len(pairs), output, as_file)
    if summary.count("failed"):
        raise typer.Exit(1)


def _summary(summary: BatchSummary, of: int, output: str | Path, as_file: bool) -> None:
    """The last line, on stdout: counts, the wall time, and where the outputs are (`where_outputs`)."""
    done, skipped, failed = summary.count("done"), summary.count("skipped"), summary.count("failed")
    where = where_outputs(output, done, skipped, as_file=as_file)
    text = f"{done} done, {skipped} skipped, {failed} failed of {of} images in {summary.seconds:.1f} s; {where}"
    Console(highlight=False, soft_wrap=True).print(text, markup=False)
