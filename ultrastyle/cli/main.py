"""The `ultrastyle` console script: thin typer commands over the library."""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TextIO

import typer
from typer.core import TyperCommand, TyperGroup

from ultrastyle.cli.build import build_command
from ultrastyle.cli.calibrate import calibrate_command
from ultrastyle.cli.doctor import doctor_command
from ultrastyle.cli.distill import distill_command, train_decoder_command
from ultrastyle.cli.export import export_command
from ultrastyle.cli.models import app as models_app
from ultrastyle.cli.optimize import optimize_command
from ultrastyle.cli.stylize import stylize_command
from ultrastyle.runtime.memory import keep_freed_memory

RICH_HELP_MIN_WIDTH = 120  # columns: narrower, help and usage errors are Click's plain text (`_plain_unless_wide`)


def _wide_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal of at least `RICH_HELP_MIN_WIDTH` columns."""
    return stream.isatty() and shutil.get_terminal_size().columns >= RICH_HELP_MIN_WIDTH


@contextlib.contextmanager
def _plain_unless_wide(command: Any, stream: TextIO) -> Iterator[None]:
    """``command`` (a typer command or group) without rich's formatting inside, unless it writes to a `_wide_terminal`
    (help: stdout; usage errors: stderr): in a log, a pipe or a narrow terminal rich's panels cut flag names
    (``--checkpoint-eve…``), wrap help 17 columns wide and split paths in error boxes mid-name, where Click's plain
    text wraps between words. Nested (the group's help inside its run), each judges its own stream."""
    before = command.rich_markup_mode
    own = command.__dict__.setdefault("_own_markup_mode", before)  # the mode as built, before any of these swaps
    command.rich_markup_mode = own if _wide_terminal(stream) else None
    try:
        yield
    finally:
        command.rich_markup_mode = before


class _BareFlags:
    """Help without typer's ``<bool>`` beside a flag, which reads as if it took a value (``--skip-existing true``)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params

    def format_help(self, ctx: Any, formatter: Any) -> None:
        with _plain_unless_wide(self, sys.stdout):
            return super().format_help(ctx, formatter)  # type: ignore[misc]


class _Command(_BareFlags, TyperCommand):
    pass


class _Group(_BareFlags, TyperGroup):
    def main(self, *args: Any, **kwargs: Any) -> Any:  # its usage errors: plain lines where help is plain
        with _plain_unless_wide(self, sys.stderr):
            return super().main(*args, **kwargs)


app = typer.Typer(
    cls=_Group,
    name="ultrastyle",
    help="Ultra-resolution universal style transfer (Collaborative Distillation, WCT, AdaIN).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from ultrastyle._version import __version__

        typer.echo(f"ultrastyle {__version__}")
        raise typer.Exit()


@app.callback()
def _process_setup(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)] = False,
) -> None:
    """Process-wide settings every command benefits from (the library leaves them to its caller)."""
    keep_freed_memory()  # large tensors reuse freed heap pages instead of faulting in fresh ones


def _interruptible(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` saying one line on a Ctrl-C it does not report itself (typer would exit 130 in silence).

    The commands report a Ctrl-C during their work (what was finished, how to resume); this covers the rest: loading
    modules (torch takes seconds), checking inputs.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: nothing partial is left (every file is written whole or not at all)\n")
            raise typer.Exit(130) from None

    return run


app.command("stylize")(stylize_command)
app.command("optimize")(optimize_command)
app.command("export")(export_command)
app.command("distill")(distill_command)
app.command("train-decoder")(train_decoder_command)
app.command("build")(build_command)
app.command("calibrate")(calibrate_command)
app.command("doctor")(doctor_command)
app.add_typer(models_app, name="models", help="List, download, import and verify published models.", cls=_Group)
for _info in (*app.registered_commands, *models_app.registered_commands):
    _info.callback = _interruptible(_info.callback)  # type: ignore[arg-type]
    _info.cls = _Command

if __name__ == "__main__":  # pragma: no cover - the bare app (tests); `ultrastyle` and `python -m ultrastyle` run `cli.entry`
    app()
