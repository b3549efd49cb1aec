"""Progress in a log: with stderr not a terminal, a live bar would be one line cut at 80 columns, drawn once at the end.

A long command shows its bar on a terminal and prints `LogLines` in a log instead.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ultrastyle.cli.remedies import swap

# Seconds between progress lines in a log; milestones (a checkpoint, a scale done, the end) always get one.
LOG_LINE_SECONDS = 30.0


class LogLines:
    """Plain progress lines on ``console`` when it is not a terminal (a log): milestones, and one every ``every`` seconds."""

    def __init__(self, console: Console, every: float | None = None, quiet: bool = False) -> None:
        self.console, self.every = console, LOG_LINE_SECONDS if every is None else every  # read now: a test may set it
        self.quiet = quiet  # neither lines nor a bar (`--quiet`)
        self._said = time.monotonic()

    @property
    def active(self) -> bool:
        """Whether lines are printed (no live bar is drawn)."""
        return not self.quiet and not self.console.is_terminal

    @property
    def bar(self) -> bool:
        """Whether a live bar is drawn."""
        return not self.quiet and self.console.is_terminal

    def say(self, text: str, *, milestone: bool = False) -> None:
        """Print ``text`` as one line if this is a log and it is a milestone or ``every`` seconds passed since the last line."""
        if self.active and (milestone or time.monotonic() - self._said >= self.every):
            self._said = time.monotonic()
            self.console.print(text, markup=False, soft_wrap=True, highlight=False)


def warning_lines(console: Console) -> Callable[..., None]:
    """A `warnings.showwarning` that says the library's warnings as ``warning: ...`` lines on ``console`` (not Python's
    file:line form), a setting the warning carries (``.remedy``, named the library's way: tile_min=40) as its flag."""

    def show(message: Warning | str, *args: object, **kwargs: object) -> None:
        console.print(f"warning: {swap(str(message), getattr(message, 'remedy', None))}", style="yellow", markup=False, soft_wrap=True)

    return show


def saying_warnings(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with the library's warnings said as `warning_lines` on stderr."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            warnings.showwarning = warning_lines(Console(stderr=True, highlight=False, soft_wrap=True))
            command(*args, **kwargs)

    return run


def where_outputs(output: str | Path, done: int, skipped: int, *, as_file: bool = False) -> str:
    """A batch summary's last words: where its outputs are (absolute, ``~`` expanded: a log is read elsewhere), or that
    nothing was written; ``as_file``: ``output`` is the one output file."""
    path = Path(output).expanduser().absolute()
    where = str(path) if as_file else f"outputs in {path}"
    return where if done else f"nothing new written; {where}" if skipped else "no output was written"
