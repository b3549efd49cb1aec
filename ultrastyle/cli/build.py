"""`ultrastyle build`: TensorRT engines for a bundle on this GPU, or ``--check`` without one."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ultrastyle.cli.logs import saying_warnings
from ultrastyle.cli.remedies import as_command, bad_parameter, swap

if TYPE_CHECKING:
    from ultrastyle.options import OptionError


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)


@saying_warnings
def build_command(
    bundle: Annotated[str, typer.Argument(metavar="BUNDLE", help="Bundle folder (ultrastyle export), or a zoo name / weights folder: its cached bundle, where stylize --backend auto finds the engines.", show_default=False)],
    precision: Annotated[Precision, typer.Option(case_sensitive=False, help="fp32; fp16 (the graphs are converted to float16 before the build); int8 (needs the bundle's Q/DQ graphs: ultrastyle calibrate).")] = Precision.fp32,
    tile_min: Annotated[int | None, typer.Option("--tile-min", min=1, help="Smallest tile region side in pixels the engines accept (default: 2 x the stage's grid).")] = None,
    tile_opt: Annotated[int | None, typer.Option("--tile-opt", min=1, help="Tile region side the engines are tuned for (default: --tile-max).")] = None,
    tile_max: Annotated[int | None, typer.Option("--tile-max", min=1, help="Largest tile region side in pixels (default: what the planner picks for a 2GB budget).")] = None,
    workspace: Annotated[str, typer.Option(help="TensorRT builder workspace limit, e.g. 1GB (binary: 1 GiB).")] = "1GB",
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file, kept across builds (default: $ULTRASTYLE_HOME/tensorrt/timing_<gpu>_sm<cc>_trt<version>.cache).")] = None,
    stages: Annotated[str | None, typer.Option(help="Stages to build (default: every stage of the bundle)", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Check statically, without a GPU or TensorRT: ops and attributes the TensorRT parser supports, Q/DQ rules, profiles, engine staleness. Exit 1 on any problem.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Rebuild engines even when they are fresh.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="TensorRT's verbose log.")] = False,
) -> None:
    """Build a TensorRT engine per stage network into BUNDLE/engines/<gpu>_sm<cc>_trt<version>/.

    Engines already built for this GPU and TensorRT version from the same
    graphs are kept; stale or foreign ones are rebuilt (and never run).
    """
    from ultrastyle.deploy import build_tensorrt, check_tensorrt
    from ultrastyle.errors import RunnerError
    from ultrastyle.export.bundle import BundleError
    from ultrastyle.models.convert import CheckpointError
    from ultrastyle.models.errors import ZooError
    from ultrastyle.options import OptionError, memory_budget, stage_set
    from ultrastyle.trt.graphs import BundleRefused, GraphError

    try:
        asked = stage_set("stages", stages)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    try:
        memory_budget("workspace", workspace)  # a typo is refused with --check too, which takes no workspace
    except OptionError as exc:
        raise _bad_option(exc) from None
    tiles = {"tile_min": tile_min, "tile_opt": tile_opt, "tile_max": tile_max}
    if check and (given := [f for f, on in (("--force", force), ("--timing-cache", timing_cache is not None), ("--verbose", verbose)) if on]):
        raise typer.BadParameter(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a build, and --check builds nothing; "
                                 "leave it out, or build without --check", param_hint=given[0])  # fmt: skip
    if check:
        try:
            report = check_tensorrt(bundle, precision=precision.value, stages=asked, **tiles)
        except OptionError as exc:  # the library names its keywords; here they are flags
            raise _bad_option(exc) from None
        except (BundleError, ZooError, CheckpointError) as exc:  # unreadable, or no such model: refused before any check
            _err(as_command(exc))
            raise typer.Exit(2) from None
        _print_check(report, precision.value)
        return
    from ultrastyle.trt.build import BuildError
    from ultrastyle.trt.env import TensorRTUnavailable

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with err.status("building TensorRT engines") as status:
            built = build_tensorrt(
                bundle, precision=precision.value, stages=asked, workspace=workspace, timing_cache=timing_cache, force=force,
                verbose=verbose, on_step=lambda msg: (status.update(msg), err.print(msg, markup=False)), **tiles,
            )  # fmt: skip
    except OptionError as exc:
        raise _bad_option(exc) from None
    except (TensorRTUnavailable, BundleError, BundleRefused, ZooError, CheckpointError) as exc:  # refused before any work, as `stylize --backend tensorrt` is
        _err(as_command(exc))
        raise typer.Exit(2) from None
    except (RunnerError, GraphError, BuildError, OSError) as exc:
        _err(as_command(exc))
        raise typer.Exit(1) from None
    Console(highlight=False, soft_wrap=True).print(
        f"{len(built.built)} engine(s) built, {len(built.fresh)} up to date, in {built.folder} ({built.seconds:.0f} s)"
    )


def _bad_option(exc: OptionError) -> typer.BadParameter:
    """A tile side's error names the three flags: which of them is out of order is in the message."""
    return bad_parameter(exc, hint="--tile-min/--tile-opt/--tile-max" if exc.option.startswith("tile_") else None)


def _print_check(report, precision: str) -> None:
    """One line per finding, then the verdict; exit 1 unless compatible."""
    out = Console(highlight=False, soft_wrap=True)
    for f in report.findings:
        out.print(swap(str(f), f.remedy), style="red" if f.severity == "error" else "yellow", markup=False)
    prof = ", ".join(f"stage {k}: {r.min}..{r.opt}..{r.max}" for k, r in sorted(report.ranges.items()))
    verdict = "compatible" if report.ok else f"NOT compatible: {len(report.errors)} problem(s)"
    out.print(
        f"{report.bundle}: {verdict} with TensorRT at {precision} ({report.graphs} graphs, {report.nodes} nodes checked statically; "
        f"{len(report.warnings)} warning(s)); tile profiles (px) {prof}",
        markup=False,
    )
    if not report.ok:
        raise typer.Exit(1)
