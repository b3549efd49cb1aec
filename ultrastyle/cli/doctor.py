"""`ultrastyle doctor`: `ultrastyle.doctor`'s checks as a table, each fix as the command that applies it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ultrastyle.checkup import doctor, ready
from ultrastyle.cli.remedies import swap


def doctor_command(
    baseline: bool = typer.Option(True, help="Measure the memory baseline of each CPU backend: a child process each, 10-40 s "
                                  "(the first time, the model's ONNX bundle is exported into the cache)."),
    model: str = typer.Option(None, help="The zoo model to check and measure with (default: the default model)."),
) -> None:
    """Report Python, the memory setup, PyTorch, ONNX Runtime, TensorRT, cuda-python, pycuda, the GPU and driver,
    the model's files and the memory baseline of each CPU backend with it (ultrastyle.doctor() from Python).

    Exit status 0 on a healthy setup, CPU-only included; what is missing comes
    with the command that installs it. 1 where something present is unusable
    (a damaged model, a backend that fails to open).
    """
    from ultrastyle.trt.env import missing_for_tensorrt

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("component")
    table.add_column("status")
    table.add_column("details", overflow="fold")  # a long path folds onto the next line, not cut with an ellipsis
    checks = doctor(model, baseline=baseline)
    for c in checks:
        style = {"ok": "green", "missing": "yellow", "unusable": "red"}.get(c.status, "")
        table.add_row(escape(c.what), f"[{style}]{c.status}[/]" if style else c.status, escape(swap(c.detail, c.remedy)))
    out = Console(highlight=False, soft_wrap=True)
    out.print(table)
    unusable = [c for c in checks if c.blocking and c.status == "unusable"]  # the CPU path itself (TensorRT unusable on a CPU machine is not)
    missing = missing_for_tensorrt()
    if unusable:
        out.print(f"not ready: {len(unusable)} problem(s) above ({', '.join(c.what for c in unusable)})", markup=False)
    elif missing:
        out.print(f"backends: onnxruntime and torch ready; tensorrt not usable here ({len(missing)} missing above)", markup=False)
    else:
        out.print("backends: onnxruntime, torch and tensorrt ready (build engines with: ultrastyle build BUNDLE)", markup=False)
    raise typer.Exit(0 if ready(checks) else 1)
