"""The console script's entry: a Ctrl-C before a command's work is one line and exit 130, not a traceback or silence."""

from __future__ import annotations

import sys

_STARTING = "interrupted while starting; nothing was done\n"


def main() -> None:
    """Run the `ultrastyle` command line (`cli.main.app`)."""
    try:
        from ultrastyle.cli.main import app

        app()  # builds every command, then parses (a Ctrl-C inside a command is the command's, or `cli.main`'s, to report)
    except KeyboardInterrupt:  # loading the modules, building the commands
        sys.stderr.write(_STARTING)
        sys.exit(130)
    except SystemExit as exc:
        # typer turns a Ctrl-C while it parses (its converters import pydantic: a second) into exit 130 in silence; the
        # commands' own reports come with no KeyboardInterrupt behind them.
        if exc.code == 130 and isinstance(getattr(exc.__context__, "__cause__", None), KeyboardInterrupt):
            sys.stderr.write(_STARTING)
        raise
