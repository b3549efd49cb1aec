"""`ultrastyle models ...`: list, fetch, import, verify, locate and remove published models."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich import box
from rich.markup import escape
from rich.table import Table

from ultrastyle.cli.remedies import as_command, swap

from ultrastyle.models import zoo
from ultrastyle.models.registry import UnknownModelError

app = typer.Typer(
    help="List, download, import, verify and remove published models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Model name, as shown by `ultrastyle models list` (e.g. cd-wct-16x).")]


def _stdout() -> Console:
    # Built per call: CliRunner and callers swap sys.stdout/sys.stderr.
    return Console(highlight=False, soft_wrap=True)


def _fail(message: str, status: int = 1) -> None:
    """Print one red `error: ...` line on stderr and exit with ``status``."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)
    raise typer.Exit(status)


@contextmanager
def _zoo_errors() -> Iterator[None]:
    """Turn a ZooError into a one-line message (no traceback): exit 2 for a name the registry lacks or a source that is
    no folder, as other commands refuse a bad argument; 1 for the rest."""
    try:
        yield
    except zoo.ZooError as exc:
        # Messages are single sentences; flatten any newline so it stays one line.
        _fail(" ".join(as_command(exc).split()), 2 if isinstance(exc, (UnknownModelError, zoo.SourceFolderError)) else 1)


@contextmanager
def _installing(name: str) -> Iterator[None]:
    """A Ctrl-C during an install says what is left and how to finish (the model is half there, each file whole)."""
    try:
        yield
    except KeyboardInterrupt:
        entry = zoo.get_entry(name)
        have = sum((zoo.model_dir(name) / f.name).is_file() for f in entry.files)
        sys.stderr.write(f"interrupted: {have} of {len(entry.files)} files of {name} are installed, each whole; "
                         "run the same command again to finish (files already verified are kept)\n")  # fmt: skip
        raise typer.Exit(130) from None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _stages(stages: tuple[int, ...]) -> str:
    """``1-5`` for a run of stages, else ``4`` or ``1,3``."""
    if len(stages) > 2 and list(stages) == list(range(stages[0], stages[-1] + 1)):
        return f"{stages[0]}-{stages[-1]}"
    return ",".join(map(str, stages))


def _sources(entry: zoo.ZooEntry) -> str:
    """``url``, ``package``, ``from:MODEL`` (files reused from another model), joined by ``+``."""
    parts = [k for k in entry.source_kinds if k != "from"]
    parts += [f"from:{m}" for m in entry.depends_on]
    return "+".join(parts)


# installed column: what the cache holds (zoo.install_status; every present file hashed).
_STATUS_CELLS = {"installed": "[green]yes[/green]", "absent": "no", "incomplete": "[yellow]incomplete[/yellow]",
                 "outdated": "[yellow]outdated[/yellow]", "damaged": "[red]damaged[/red]"}  # fmt: skip


_NARROW = 76  # columns below which the table no longer fits (names and sources cut): one block per model instead


@app.command("list")
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (name, status, files, bytes, stages, sources, path, "
                                                          "bundles, description) for scripts.")] = False,  # fmt: skip
) -> None:
    """Show every model in the registry: files, total size, stages, where its files come from, whether installed.

    Sources: url (downloaded), package (shipped inside ultrastyle), from:MODEL (the same files as MODEL's).
    """
    with _zoo_errors():
        statuses = {name: zoo.install_status(name) for name in zoo.entries()}
        models = sorted(zoo.entries().items())
        if as_json:
            rows = [{"name": name, "status": statuses[name], "files": len(e.files), "bytes": e.total_bytes, "stages": list(e.stages),
                     "sources": _sources(e).split("+"), "path": str(zoo.model_dir(name)),
                     "bundles": [str(b) for b in zoo.cached_bundles(name)], "description": e.description}
                    for name, e in models]  # fmt: skip
            typer.echo(json.dumps(rows, indent=2))
            return
        out = _stdout()
        if out.width < _NARROW:
            out.print(f"Models (cache: {zoo.home_dir() / 'models'})", markup=False)
            for name, entry in models:
                out.print(f"\n[bold]{name}[/bold]  installed: {_STATUS_CELLS[statuses[name]]}")
                stages = f"stage{'s' if len(entry.stages) > 1 else ''} {_stages(entry.stages)}"
                out.print(f"  {len(entry.files)} files, {_human(entry.total_bytes)}, {stages}, from {_sources(entry)}", markup=False)
                # The console does not wrap (soft_wrap: one line per error when piped): a description is folded here.
                out.print(textwrap.fill(entry.description, max(out.width, 40) - 1, initial_indent="  ", subsequent_indent="  "), markup=False)
        else:
            # Compact columns so the table fits 80 columns; descriptions follow it, wrapped.
            table = Table(title=f"Models (cache: {zoo.home_dir() / 'models'})", title_justify="left", box=box.SIMPLE_HEAD)
            table.add_column("name", no_wrap=True, style="bold")
            table.add_column("files", justify="right", no_wrap=True)
            table.add_column("size", justify="right", no_wrap=True)
            table.add_column("stages", no_wrap=True)
            table.add_column("source")
            table.add_column("installed", no_wrap=True)
            for name, entry in models:
                table.add_row(name, str(len(entry.files)), _human(entry.total_bytes), _stages(entry.stages),
                              _sources(entry).replace("+", "\n"), _STATUS_CELLS[statuses[name]])  # fmt: skip
            out.print(table)
        if bad := [n for n, st in sorted(statuses.items()) if st in ("damaged", "incomplete")]:
            out.print(f"{', '.join(bad)}: damaged or half installed; see: ultrastyle models verify", markup=False)
        if out.width >= _NARROW:
            for name, entry in models:
                out.print(f"[bold]{name}[/bold]: {escape(entry.description)}")


@app.command("fetch")
def fetch(
    name: NameArg,
    mirror: Annotated[
        Optional[str],
        typer.Option(
            help="Base URL to download from instead of the pinned URLs; files are read from "
            "URL/NAME/FILE. Default: $ULTRASTYLE_MIRROR.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even files already installed and verified.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for a connection or for data before giving up.")] = 60.0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar on stderr.")] = True,
) -> None:
    """Download a model into the cache, verifying every file's sha256; prints its directory."""
    if not 0 < timeout < math.inf:
        raise typer.BadParameter(f"expected a positive number of seconds, got {timeout}", param_hint="--timeout")
    if mirror is not None:
        try:
            zoo.check_mirror(mirror, name)
        except zoo.ZooError as exc:
            raise typer.BadParameter(as_command(exc), param_hint="--mirror") from None
    with _zoo_errors(), _installing(name):
        d = zoo.fetch(name, mirror=mirror, force=force, progress=progress, timeout=timeout)
    typer.echo(str(d))


@app.command("import")
def import_(
    name: NameArg,
    directory: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="[DIR]",
            help="Folder holding the model's downloadable (url) files, flat (1SE.pth ...) or in a NAME/ sub-folder. "
            "Not needed for a model whose files all ship with ultrastyle or come from installed models.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Copy again even files already installed and verified.")] = False,
) -> None:
    """Install a model from local copies of its files (offline machines); every sha256 is checked.

    Packaged files are copied from the ultrastyle package and files reused from
    another model from that model (imported from DIR first if it is not
    installed); nothing is downloaded.
    """
    with _zoo_errors():
        already = not force and zoo.install_status(name) == "installed"
        with _installing(name):
            d = zoo.import_local(name, directory, force=force)
    if already:  # nothing was copied: not "imported", which would vouch for DIR
        read = f"; {directory} was not read (--force copies its files again)" if directory is not None else ""
        typer.echo(f"{name} is already installed and verified in {d}{read}")
    else:
        typer.echo(f"imported {name} into {d}")


@app.command("verify")
def verify(
    name: Annotated[
        Optional[str],
        typer.Argument(help="Model to check; all models with files in the cache when omitted.", show_default=False),
    ] = None,
) -> None:
    """Re-hash installed files; exit status 1 with one line per problem if any file is missing or altered."""
    with _zoo_errors():
        if name is not None:
            names = [zoo.get_entry(name).name]
        else:
            # "Installed" here means anything on disk: a half-damaged model must
            # still be reported, though is_installed() would call it absent.
            names = [
                n
                for n, e in sorted(zoo.entries().items())
                if any((zoo.model_dir(n) / f.name).exists() for f in e.files)
            ]
        if not names:
            typer.echo("no models installed (see: ultrastyle models list)")
            return
        problems: list[str] = []
        repairs: list[str] = []
        for n in names:
            found = zoo.verify(n)
            if found:
                problems += found
                repairs.append(f"repair {n} with: {swap(zoo.reinstall_text(n), zoo.reinstall(n))}")
            else:
                typer.echo(f"ok: {n} ({len(zoo.get_entry(n).files)} files, sha256 verified)")
    if problems:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        for p in problems:
            err.print(f"error: {p}", style="red", markup=False)
        for r in repairs:
            err.print(r, markup=False)
        raise typer.Exit(1)


@app.command("path")
def path(name: NameArg) -> None:
    """Print the directory holding an installed model (exit status 1 if it is not installed, or a file of it is damaged)."""
    with _zoo_errors():
        status = zoo.install_status(name)
        if status != "installed":
            what = "not installed" if status == "absent" else f"{status} (see: ultrastyle models verify {name})"
            _fail(f"model {name} is {what} in {zoo.model_dir(name)}; run: {swap(zoo.reinstall_text(name), zoo.reinstall(name))}")
        d = zoo.model_dir(name)
    typer.echo(str(d))


@app.command("remove")
def remove(
    name: NameArg,
    keep_bundles: Annotated[bool, typer.Option("--keep-bundles", help="Keep the ONNX bundles exported from the model (and the int8 "
                                                                      "calibrations and TensorRT engines in them).")] = False,  # fmt: skip
) -> None:
    """Delete an installed model's files from the cache, and the ONNX bundles exported from it unless --keep-bundles.

    Bundles are exported again on first use; int8 calibrations and TensorRT engines in them must be made again.
    """
    with _zoo_errors():
        removed = zoo.remove(name, bundles=not keep_bundles)
        fix = swap(zoo.reinstall_text(name), zoo.reinstall(name))
    if not removed.files and not removed.bundles:
        typer.echo(f"{name} has nothing in the cache ({zoo.model_dir(name)}); nothing removed")
        return
    linked = removed.files == [zoo.model_dir(name)]  # the model folder was a link: it alone went
    parts = [f"the link {removed.files[0]} (the folder it points to is kept)" if linked else f"{len(removed.files)} files from "
             f"{zoo.model_dir(name)}"] if removed.files else []  # fmt: skip
    parts += [f"{len(removed.bundles)} bundle(s) from {zoo.bundles_dir()}"] if removed.bundles else []
    typer.echo(f"removed {name}: {' and '.join(parts)} ({_human(removed.freed)} freed); to use it again: {fix}")
    kept = zoo.cached_bundles(name)
    if kept:
        typer.echo(f"kept {len(kept)} bundle(s) exported from it in {zoo.bundles_dir()} (ultrastyle models remove {name} deletes them)")
