"""`ultrastyle doctor`: `ultrastyle.doctor`'s checks as a table, each fix as the command that applies it."""

from __future__ import annotations

import textwrap

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ultrastyle.checkup import doctor, ready
from ultrastyle.cli.remedies import swap

NARROW = 72  # columns below which the table's details column splits paths and commands: one block per check instead


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

    checks = doctor(model, baseline=baseline)
    out = Console(highlight=False, soft_wrap=True)
    styles = {"ok": "green", "missing": "yellow", "unusable": "red"}
    if out.width < NARROW:  # a details column this narrow split paths and install commands mid-word: one block per check
        for c in checks:
            out.print(f"[bold]{escape(c.what)}[/bold]: {_status(c.status, styles)}")
            text = swap(c.detail, c.remedy)  # wrapped between words only: a path or a command stays whole, to copy
            out.print(textwrap.fill(text, max(out.width, 20) - 1, initial_indent="  ", subsequent_indent="  ",
                                    break_long_words=False, break_on_hyphens=False), markup=False)  # fmt: skip
    else:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("component")
        table.add_column("status")
        table.add_column("details", overflow="fold")  # a long path folds onto the next line, not cut with an ellipsis
        for c in checks:
            table.add_row(escape(c.what), _status(c.status, styles), escape(swap(c.detail, c.remedy)))
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


def _status(status: str, styles: dict[str, str]) -> str:
    """A check's status as rich markup, coloured where it has a colour."""
    style = styles.get(status)
    return f"[{style}]{status}[/]" if style else status
