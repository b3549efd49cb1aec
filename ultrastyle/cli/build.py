"""`ultrastyle build`: TensorRT engines for a bundle on this GPU, or ``--check`` without one."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.export.bundle import BundleError, read_bundle
from ultrastyle.runtime.backends.base import RunnerError
from ultrastyle.runtime.cascade import parse_levels


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)


def build_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (ultrastyle export).", show_default=False)],
    precision: Annotated[Precision, typer.Option(help="fp32; fp16 (the graphs are converted to float16 before the build); int8 (needs the bundle's Q/DQ graphs: ultrastyle calibrate).")] = Precision.fp32,
    tile_min: Annotated[int | None, typer.Option("--tile-min", min=1, help="Smallest tile region side in pixels the engines accept (default: 2 x the stage's grid).")] = None,
    tile_opt: Annotated[int | None, typer.Option("--tile-opt", min=1, help="Tile region side the engines are tuned for (default: --tile-max).")] = None,
    tile_max: Annotated[int | None, typer.Option("--tile-max", min=1, help="Largest tile region side in pixels (default: what the planner picks for a 2GB budget).")] = None,
    workspace: Annotated[str, typer.Option(help="TensorRT builder workspace limit, e.g. 1GB.")] = "1GB",
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file, kept across builds (default: $ULTRASTYLE_HOME/tensorrt/timing_<gpu>_sm<cc>_trt<version>.cache).")] = None,
    stages: Annotated[str | None, typer.Option(help="Stages to build \\[default: every stage of the bundle]", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Check statically, without a GPU or TensorRT: ops and attributes the TensorRT parser supports, Q/DQ rules, profiles, engine staleness. Exit 1 on any problem.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild engines even when they are fresh.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="TensorRT's verbose log.")] = False,
) -> None:
    """Build a TensorRT engine per stage network into BUNDLE/engines/<gpu>_sm<cc>_trt<version>/.

    Engines already built for this GPU and TensorRT version from the same
    graphs are kept; stale or foreign ones are rebuilt (and never run).
    """
    from ultrastyle.trt.graphs import GraphError
    from ultrastyle.trt.profiles import requested_ranges

    try:
        asked = tuple(sorted(set(parse_levels(stages)))) if stages is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stages") from None
    try:
        workspace_bytes = parse_bytes(workspace)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workspace") from None
    try:
        b = read_bundle(bundle)
    except BundleError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    stage_tuple = asked or tuple(sorted(b.stages))
    if why := b.stages_problem(stage_tuple):
        _err(f"{why} (use --stages)")
        raise typer.Exit(2)
    try:
        ranges = requested_ranges(b.arch, stage_tuple, tile_min=tile_min, tile_opt=tile_opt, tile_max=tile_max, precision=precision.value)
    except ValueError as exc:  # the library names its keywords; here they are flags
        raise typer.BadParameter(str(exc).replace("tile_", "--tile-"), param_hint="--tile-min/--tile-opt/--tile-max") from None
    if check:
        _check(b, precision.value, ranges, stage_tuple)
        return
    from ultrastyle.trt.build import BuildError, build_engines
    from ultrastyle.trt.env import TensorRTUnavailable

    err = Console(stderr=True, highlight=False)
    try:
        with err.status("building TensorRT engines") as status:
            report = build_engines(
                b, precision=precision.value, ranges=ranges, stages=stage_tuple, workspace=workspace_bytes,
                timing_cache=timing_cache, force=force, verbose=verbose,
                on_step=lambda msg: (status.update(msg), err.print(msg, markup=False)),
            )  # fmt: skip
    except TensorRTUnavailable as exc:  # refused before any work, as `stylize --backend tensorrt` is
        _err(_as_flags(str(exc)))
        raise typer.Exit(2) from None
    except (RunnerError, GraphError, BuildError, OSError) as exc:
        _err(_as_flags(str(exc)))
        raise typer.Exit(1) from None
    Console(highlight=False).print(
        f"{len(report.built)} engine(s) built, {len(report.fresh)} up to date, in {report.folder} ({report.seconds:.0f} s)"
    )


def _as_flags(message: str) -> str:
    """A library message with its keywords in parentheses given as this command's flags."""
    for keyword in ("tile_min", "tile_opt", "tile_max", "workspace"):
        message = message.replace(f"({keyword})", f"(--{keyword.replace('_', '-')})")
    return message


def _check(bundle, precision: str, ranges, stages: tuple[int, ...]) -> None:
    from ultrastyle.trt.check import check_bundle

    report = check_bundle(bundle, precisions=(precision,), ranges=ranges, stages=stages)
    out = Console(highlight=False, soft_wrap=True)
    for f in report.findings:
        out.print(_as_flags(str(f)), style="red" if f.severity == "error" else "yellow", markup=False)
    prof = ", ".join(f"stage {k}: {r.min}..{r.opt}..{r.max}" for k, r in sorted(ranges.items()))
    verdict = "compatible" if report.ok else f"NOT compatible: {len(report.errors)} problem(s)"
    out.print(
        f"{bundle.path}: {verdict} with TensorRT at {precision} ({report.graphs} graphs, {report.nodes} nodes checked statically; "
        f"{len(report.warnings)} warning(s)); tile profiles (px) {prof}",
        markup=False,
    )
    if not report.ok:
        raise typer.Exit(1)
