"""The command line's side of `ultrastyle.errors.Remedy`: the fix an error suggests, as the command that does it.

Library messages show a remedy as a Python call (``ultrastyle.build_tensorrt('b', precision='fp16')``);
`as_command` swaps it for the command (``ultrastyle build b --precision fp16``) when the CLI reports the error.
"""

from __future__ import annotations

from ultrastyle.errors import Remedies, Remedy, remedies_of

# Remedy.function -> (command, what each positional argument is there: None a positional, else its flag; flags it always has).
COMMANDS: dict[str, tuple[str, tuple[str | None, ...], tuple[str, ...]]] = {
    "build_tensorrt": ("ultrastyle build", (None,), ()),
    "check_tensorrt": ("ultrastyle build", (None,), ("--check",)),
    "calibrate": ("ultrastyle calibrate", (None, "--images"), ()),
    "export_model": ("ultrastyle export", (None, "--output"), ()),
    "models.zoo.fetch": ("ultrastyle models fetch", (None,), ()),
    "models.zoo.import_local": ("ultrastyle models import", (None, None), ()),
    "models.zoo.entries": ("ultrastyle models list", (), ()),
}


def command(remedy: Remedy) -> str:
    """``remedy`` as a command line: keywords as ``--flags`` (True: the flag alone)."""
    name, positional, always = COMMANDS[remedy.function]
    parts = [name]
    for flag, value in zip(positional, remedy.args):
        parts += [str(value)] if flag is None else [flag, str(value)]
    for key, value in remedy.kwargs:
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join([*parts, *always])


def swap(text: str, remedy: Remedies) -> str:
    """``text`` with each of ``remedy``'s Python calls that it holds written as the command that applies it."""
    for r in remedies_of(remedy):
        if r.function in COMMANDS:
            text = text.replace(r.python(), command(r))
    return text


def as_command(exc: BaseException, text: str | None = None) -> str:
    """``text`` (default: ``str(exc)``) with ``exc``'s remedy, if any, written as a command."""
    return swap(str(exc) if text is None else text, getattr(exc, "remedy", None))
