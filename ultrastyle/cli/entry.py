"""The console script's entry: a Ctrl-C before a command's work is one line and exit 130, not a traceback or silence.

SIGTERM (what `kill`, systemd and job schedulers send) is taken as a Ctrl-C, so temp files are removed and outputs being
written are finished as they are on a Ctrl-C; the exit status is then 143 (128 + SIGTERM), the shells' convention.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from types import FrameType

_STARTING = "interrupted while starting; nothing was done\n"
TERMINATED = 128 + signal.SIGTERM
_terminated = threading.Event()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _terminated.set()
    raise KeyboardInterrupt  # unwinds as a Ctrl-C does: the commands' reports, atomic writes' clean-up


def _exit_status(code: object) -> object:
    return TERMINATED if code == 130 and _terminated.is_set() else code


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
                  line: str | None = None) -> None:  # fmt: skip
    """A user-facing warning before or beside a command's own report: one ``warning: ...`` line, not Python's file:line
    form naming typer's frame (commands say theirs beside their progress bars, `cli.logs.warning_lines`)."""
    if issubclass(category, UserWarning):
        from ultrastyle.cli.remedies import swap

        (file or sys.stderr).write(f"warning: {swap(str(message), getattr(message, 'remedy', None))}\n")  # type: ignore[attr-defined]
    else:  # Python's own form
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))  # type: ignore[attr-defined]


def main() -> None:
    """Run the `ultrastyle` command line (`cli.main.app`)."""
    on_main = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    if on_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # one the parent set to ignore stays ignored
        signal.signal(signal.SIGTERM, _on_sigterm)
    # A summary naming a non-ASCII path, printed into a file or pipe on Windows (the ANSI code page, strict), raised
    # after the work was done; an unencodable character is written as an escape instead.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    warnings.showwarning = _show_warning
    try:
        from ultrastyle.cli.main import app

        app()  # builds every command, then parses (a Ctrl-C inside a command is the command's, or `cli.main`'s, to report)
    except KeyboardInterrupt:  # loading the modules, building the commands
        sys.stderr.write(_STARTING)
        sys.exit(_exit_status(130))
    except SystemExit as exc:
        # typer turns a Ctrl-C while it parses (its converters import pydantic: a second) into exit 130 in silence; the
        # commands' own reports come with no KeyboardInterrupt behind them.
        if exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            sys.stderr.write(_STARTING)
        sys.exit(_exit_status(exc.code))
