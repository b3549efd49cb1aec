"""Errors that more than one layer raises.

`RunnerError` is the runner interface's error (`runtime.backends.base`),
and also what `trt` raises when TensorRT, a CUDA binding or a GPU is missing
(`trt.env.TensorRTUnavailable`): both import it from here, downward, so the
command line reports either the same way.

`Remedy` is the fix an error suggests, as data: the message shows it as a
Python call, and the command line as the command; `Setting` is a keyword the
message names (``(max_pixels)``, ``resume=True``), which the command line
shows as its flag. Library messages name no command-line flags.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar, Union


class RunnerError(RuntimeError):
    """A runner used out of order, or a backend that cannot run here (says why and what to do)."""


class Placeholder(str):
    """A value the user fills in (``YOUR_PHOTOS/``, ``N``): shown bare, not quoted, in a `Remedy`."""

    def __repr__(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Remedy:
    """A call that fixes an error, kept on the error as ``.remedy``.

    The library's message shows it as Python (`python`); a front end shows it
    its own way (the command line as a command, `ultrastyle.cli.remedies`).
    ``function`` is a name under ``ultrastyle`` (``build_tensorrt``, ``fetch_model``).
    """

    function: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def python(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"ultrastyle.{self.function}({', '.join(parts)})"


@dataclass(frozen=True)
class Setting:
    """A keyword argument that an error's message names, kept on the error with its `Remedy` (``.remedy``).

    The message shows it as Python (`python`): the keyword alone, in parentheses (``value`` left as ``...``:
    ``raise the limit (max_pixels)``), or with a value (``resume it (resume=True)``; None: leave it out, its
    default). A front end shows it its own way (the command line as the flag: ``(--max-pixels)``, ``--resume``,
    ``leave out --stages``).
    """

    keyword: str
    value: Any = ...  # Ellipsis, not a private sentinel: it is the same object after pickling (Ray workers)

    def python(self) -> str:
        return f"({self.keyword})" if self.value is ... else f"{self.keyword}={self.value!r}"


# One fix, several (``fetch`` online, ``import_local`` offline; a call and the keywords its message names), or none.
Remedies = Union[Remedy, Setting, "tuple[Remedy | Setting, ...]", None]

E = TypeVar("E", bound=BaseException)


def remedied(exc: E, remedy: Remedies) -> E:
    """``exc`` with ``remedy`` attached (its message already shows each one's ``python()``; None: no remedy)."""
    exc.remedy = remedy  # type: ignore[attr-defined]
    return exc


def remedies_of(remedy: Remedies) -> tuple[Remedy | Setting, ...]:
    """``remedy`` (as `remedied` takes it) as a tuple."""
    if isinstance(remedy, (Remedy, Setting)):
        return (remedy,)
    return tuple(r for r in remedy or () if isinstance(r, (Remedy, Setting)))


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str | Warning, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the first caller outside this package: the user's line, however deep the call
    (a fixed ``stacklevel`` names whichever library frame sits at that depth on one path or another)."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
