"""`ultrastyle export`: a model's stage networks as a validated ONNX bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ultrastyle.cli.remedies import as_command, bad_parameter
from ultrastyle.export.spec import DEFAULT_OPSET, SUPPORTED_OPSETS
from ultrastyle.models import zoo


def export_command(
    model: Annotated[str, typer.Argument(help="Zoo model name, a folder of CD weights {k}SE.pth/{k}SD.pth, or a pytorch-AdaIN folder (vgg_normalised.pth + decoder.pth).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bundle folder to write (a bundle there is replaced; one holding int8 graphs or engines needs --force; a bundle holding other files, or any other non-empty folder, is refused).")],
    opset: Annotated[int, typer.Option(min=SUPPORTED_OPSETS.start, max=SUPPORTED_OPSETS.stop - 1, help="ONNX opset.")] = DEFAULT_OPSET,
    stages: Annotated[str | None, typer.Option(help="Stages to export (default: every stage the model has)", show_default=False)] = None,
    aux: Annotated[bool, typer.Option("--aux", help="Also export encoder_auxK graphs with the Q_k embeddings as outputs (training bundles).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a bundle holding int8 graphs (ultrastyle calibrate) or TensorRT engines (ultrastyle build), which are deleted.")] = False,
) -> None:
    """Export encoder, decoder and decoder+affine graphs per stage, validated against PyTorch.

    Every graph passes onnx.checker with full shape inference and matches
    PyTorch under ONNX Runtime on several input sizes; the manifest records
    the architecture, receptive fields, sha256 of the weights and of each graph.
    """
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    from ultrastyle.options import OptionError, stage_set

    try:
        stage_tuple = stage_set("stages", stages)
    except OptionError as exc:
        raise bad_parameter(exc) from None
    from ultrastyle.deploy import export_model
    from ultrastyle.export.bundle import BundleBusy, BundleError, BundleTargetError
    from ultrastyle.export.errors import ExportValidationError
    from ultrastyle.models.convert import CheckpointError

    try:
        with err.status("exporting") as status:
            bundle = export_model(
                model, output, stages=stage_tuple, opset=opset, aux=aux, force=force,
                on_network=lambda name: status.update(f"exporting and validating {name}"),
            )
    except OptionError as exc:  # stages the model lacks: known once the model is found; an empty MODEL
        raise bad_parameter(exc, {"model": "MODEL"}) from None
    except (zoo.ZooError, CheckpointError, BundleError, ExportValidationError, OSError) as exc:
        err.print(f"error: {' '.join(as_command(exc).split())}", style="red", markup=False)
        # An output folder or a model that cannot be used is refused before any work (2); a failed export or validation is 1.
        raise typer.Exit(2 if isinstance(exc, (BundleTargetError, BundleBusy, zoo.ZooError, CheckpointError)) else 1) from None
    worst = max(v["max_abs_diff"] for v in bundle.manifest["validation"].values())
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {len(bundle.manifest['networks'])} graphs to {bundle.path} "
        f"(opset {opset}; ONNX Runtime vs PyTorch max abs diff {worst:.2e})"
    )
