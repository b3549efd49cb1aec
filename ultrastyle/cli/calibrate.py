"""`ultrastyle calibrate`: int8 (Q/DQ) stage networks for a bundle, from a folder of real images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ultrastyle.calibration.constants import (
    ACTIVATIONS,
    DEFAULT_ACTIVATIONS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_KEEP_FLOAT,
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    DEFAULT_SAMPLES,
    DEFAULT_TILE,
    KEEP_FLOAT,
    METHODS,
)
from ultrastyle.cli.remedies import as_command, bad_parameter
from ultrastyle.models import zoo


def calibrate_command(
    bundle: Annotated[str, typer.Argument(help="Bundle folder (ultrastyle export), or a zoo name / weights folder whose cached bundle to calibrate.")],
    images: Annotated[Path, typer.Option("--images", help="Folder of real images like the ones you will stylize.")],
    method: Annotated[str, typer.Option(help=f"Calibration method: {', '.join(METHODS)} (percentile measured best; entropy, KL over "
                                             "2048-bin histograms as TensorRT's, worst here and the slowest).")] = DEFAULT_METHOD,
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="Weight scales per output channel, or one per tensor.")] = True,
    samples: Annotated[int, typer.Option(min=1, help="Tiles drawn from the images (seeded). Memory grows with it: about 0.25 GB a 512 px tile (8: 2.4 GB peak, 24: 6.5 GB).")] = DEFAULT_SAMPLES,
    tile: Annotated[int, typer.Option(min=32, help="Tile side in pixels.")] = DEFAULT_TILE,
    image_size: Annotated[int, typer.Option(min=64, help="Images are resized to this long side before tiles are cut.")] = DEFAULT_IMAGE_SIZE,
    keep_float: Annotated[str, typer.Option(help=f"Layers kept in float: {', '.join(KEEP_FLOAT)} (see README).")] = DEFAULT_KEEP_FLOAT,
    activations: Annotated[
        str, typer.Option(help=f"{' or '.join(ACTIVATIONS)}: uint8 for ONNX Runtime on the CPU (about 3 dB closer to fp32); int8 (signed, zero-point 0) for TensorRT.")
    ] = DEFAULT_ACTIVATIONS,
    percentile: Annotated[float, typer.Option(help="Range kept by --method percentile (the rest is clipped).")] = DEFAULT_PERCENTILE,
    stages: Annotated[str | None, typer.Option(help="Stages to quantize (default: every stage of the bundle)", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the tile sampler.")] = 0,
) -> None:
    """Quantize the bundle's encoders and fused decoders to int8 Q/DQ graphs.

    The graphs are stored in the bundle beside the float32 ones with their
    calibration settings; `stylize --precision int8` runs them with ONNX
    Runtime, and `build --precision int8` builds TensorRT engines from graphs
    calibrated with --activations int8.
    """
    from ultrastyle.calibration.data import CalibrationDataError
    from ultrastyle.calibration.quantize import CalibrationError, CalibrationRefused
    from ultrastyle.deploy import calibrate, calibration_settings
    from ultrastyle.errors import RunnerError
    from ultrastyle.export.bundle import BundleError
    from ultrastyle.models.convert import CheckpointError
    from ultrastyle.options import OptionError, stage_set

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    settings = dict(  # the choices in any case, as every command takes its choices (--method MinMax)
        method=method.lower(), per_channel=per_channel, samples=samples, tile=tile, image_size=image_size, seed=seed,
        keep_float=keep_float.lower(), activations=activations.lower(), percentile=percentile,
    )  # fmt: skip
    try:
        calibration_settings(**settings)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    try:
        stage_tuple = stage_set("stages", stages)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    try:
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as progress:  # a log gets no blank line
            task = progress.add_task("calibrating", total=None)
            result = calibrate(
                bundle, images, stages=stage_tuple,
                on_progress=lambda msg, done, total: progress.update(task, description=msg, completed=done, total=total),
                warn=lambda msg: err.print(f"warning: {msg}", markup=False),
                on_export=lambda msg: err.print(msg, markup=False),
                **settings,
            )  # fmt: skip
    except OptionError as exc:  # an empty BUNDLE
        raise bad_parameter(exc, {"bundle": "BUNDLE"}) from None
    except (CalibrationDataError, CalibrationError, BundleError, RunnerError, zoo.ZooError, CheckpointError, OSError) as exc:
        text = " ".join(as_command(exc).split())
        err.print(f"error: {text}", style="red", markup=False, soft_wrap=True)
        # A bundle, model, image folder or settings that cannot be used are refused before any graph is written (2, as
        # `stylize` does; calibrate_bundle reads the images its tiles come from before it quantizes); the rest failed (1).
        refused = (BundleError, RunnerError, zoo.ZooError, CheckpointError, CalibrationDataError, CalibrationRefused)
        raise typer.Exit(2 if isinstance(exc, refused) else 1) from None
    done = set(result.manifest["calibration"]["stages"])
    quantized = [n for n, e in result.manifest["networks"].items() if e.get("int8") and e.get("stage") in done]
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {len(quantized)} int8 graphs into {result.path} ({method}, "
        f"{'per-channel' if per_channel else 'per-tensor'}, {samples} tiles of up to {tile} px, {activations} activations, float: {keep_float})"
    )
