"""Errors that more than one layer raises.

`RunnerError` is the runner interface's error (`runtime.backends.base`),
and also what `trt` raises when TensorRT, a CUDA binding or a GPU is missing
(`trt.env.TensorRTUnavailable`): both import it from here, downward, so the
command line reports either the same way.

`Remedy` is the fix an error suggests, as data: the message shows it as a
Python call, and the command line as the command (library messages name no
command-line flags).
"""

from __future__ import annotations

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
    ``function`` is a name under ``ultrastyle`` (``build_tensorrt``, ``models.zoo.fetch``).
    """

    function: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def python(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs]
        return f"ultrastyle.{self.function}({', '.join(parts)})"


# One fix, several (``fetch`` online, ``import_local`` offline), or none.
Remedies = Union[Remedy, "tuple[Remedy, ...]", None]

E = TypeVar("E", bound=BaseException)


def remedied(exc: E, remedy: Remedies) -> E:
    """``exc`` with ``remedy`` attached (its message already shows each ``remedy.python()``; None: no remedy)."""
    exc.remedy = remedy  # type: ignore[attr-defined]
    return exc


def remedies_of(remedy: Remedies) -> tuple[Remedy, ...]:
    """``remedy`` (as `remedied` takes it) as a tuple."""
    if isinstance(remedy, Remedy):
        return (remedy,)
    return tuple(r for r in remedy or () if isinstance(r, Remedy))
