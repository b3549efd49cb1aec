"""The command line's side of `ultrastyle.errors.Remedy` and `Setting`: the fix an error suggests, as the command or flag.

Library messages show a remedy as a Python call (``ultrastyle.build_tensorrt('b', precision='fp16')``) and a setting as
its keyword (``(max_pixels)``, ``threads=99``); `as_command` swaps them for the command (``ultrastyle build b --precision
fp16``) and the flag (``(--max-pixels)``, ``--threads 99``) when the CLI reports the error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import typer

from ultrastyle.errors import Remedies, Remedy, Setting, remedies_of

if TYPE_CHECKING:
    from ultrastyle.options import OptionError

# Remedy.function -> (command, what each positional argument is there: None a positional, else its flag; flags it always has).
COMMANDS: dict[str, tuple[str, tuple[str | None, ...], tuple[str, ...]]] = {
    "build_tensorrt": ("ultrastyle build", (None,), ()),
    "check_tensorrt": ("ultrastyle build", (None,), ("--check",)),
    "calibrate": ("ultrastyle calibrate", (None, "--images"), ()),
    "export_model": ("ultrastyle export", (None, "--output"), ()),
    "fetch_model": ("ultrastyle models fetch", (None,), ()),
    "import_model": ("ultrastyle models import", (None, None), ()),
    "list_models": ("ultrastyle models list", (), ()),
}


def command(remedy: Remedy) -> str:
    """``remedy`` as a command line: keywords as flags, as `flag` says a setting (True: the flag alone; a list: comma-separated)."""
    name, positional, always = COMMANDS[remedy.function]
    parts = [name]
    for given, value in zip(positional, remedy.args):
        parts += [str(value)] if given is None else [given, str(value)]
    parts += [flag(Setting(key, value)) for key, value in remedy.kwargs]
    return " ".join([*parts, *always])


def given_flags(ctx: typer.Context) -> set[str]:
    """The parameters set on the command line (or by an environment variable), not left at their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}  # typer's own copy of click's ParameterSource: by name
    return {name for name, source in sources.items() if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")}


def flag_name(keyword: str, flags: Mapping[str, str] | None = None) -> str:
    """The flag of the library's ``keyword``: ``flags``' entry (a command's flag that is not the keyword), else ``--kebab-case``."""
    return (flags or {}).get(keyword) or "--" + keyword.replace("_", "-")


def flag(setting: Setting, flags: Mapping[str, str] | None = None) -> str:
    """``setting`` as a command line says it (``(--max-pixels)``, ``--threads 4``, ``leave out --stages``)."""
    name = flag_name(setting.keyword, flags)
    value = setting.value
    if value is ...:
        return f"({name})"
    if value is True:
        return name
    if value is False and name.startswith("--"):  # a typer boolean flag's other half
        return f"--no-{name[2:]}"
    if value is None:
        return f"leave out {name}"
    if isinstance(value, (list, tuple)):
        return f"{name} {','.join(map(str, value))}"
    return f"{name} {value}"


def swap(text: str, remedy: Remedies, flags: Mapping[str, str] | None = None) -> str:
    """``text`` with each of ``remedy``'s Python calls written as the command that applies it, and its settings as flags."""
    found = remedies_of(remedy)
    for r in found:
        if isinstance(r, Remedy) and r.function in COMMANDS:
            text = text.replace(r.python(), command(r))
    for r in found:  # after the calls: a call's keywords are its command's flags already
        if isinstance(r, Setting):
            said = flag(r, flags)
            text = re.sub(rf"(?<![\w.-]){re.escape(r.python())}(?![\w=])", lambda _: said, text)
    return text


def as_command(exc: BaseException, text: str | None = None, flags: Mapping[str, str] | None = None) -> str:
    """``text`` (default: ``str(exc)``) with ``exc``'s remedy, if any, written as a command and its settings as flags."""
    return swap(str(exc) if text is None else text, getattr(exc, "remedy", None), flags)


def bad_parameter(exc: OptionError, flags: Mapping[str, str] | None = None, hint: str | None = None) -> typer.BadParameter:
    """A library `OptionError` as typer's usage error: its message with settings as flags, under its option's flag (or ``hint``)."""
    return typer.BadParameter(as_command(exc, exc.message, flags), param_hint=hint or flag_name(exc.option, flags))
