"""Ctrl-C outside a command's own reporting: one line and exit 130, never silence or a traceback."""

from __future__ import annotations

import importlib.abc
import re
import sys

import pytest
import typer
from typer.testing import CliRunner


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_a_ctrl_c_inside_a_command_it_does_not_report_itself_is_one_line(monkeypatch):
    import ultrastyle.cli.models as models
    from ultrastyle.cli.main import app

    monkeypatch.setattr(models.zoo, "entries", _interrupt)  # `models list` reads the zoo first
    r = CliRunner().invoke(app, ["models", "list"])
    assert r.exit_code == 130 and "interrupted: nothing partial is left" in r.output, r.output


def test_a_ctrl_c_while_typer_parses_or_sets_up_is_one_line_not_silence(monkeypatch, capsys):
    import ultrastyle.cli.main as cli
    from ultrastyle.cli.entry import main

    monkeypatch.setattr(cli, "keep_freed_memory", _interrupt)  # the group's set-up, inside typer's silent 130
    monkeypatch.setattr(sys, "argv", ["ultrastyle", "models", "list"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted while starting; nothing was done\n"


def test_a_ctrl_c_while_the_command_line_loads_is_one_line_not_a_traceback(monkeypatch, capsys):
    from ultrastyle.cli.entry import main

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ultrastyle.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "ultrastyle.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted while starting; nothing was done\n"


def test_a_command_that_reports_its_own_ctrl_c_is_not_reported_twice(monkeypatch, capsys, tmp_path):
    import ultrastyle.cli.main as cli
    from ultrastyle.cli.entry import main

    def stylize_interrupted(*args: object, **kwargs: object) -> None:
        import typer

        sys.stderr.write("the command's own line\n")
        raise typer.Exit(130)

    monkeypatch.setattr(cli, "keep_freed_memory", stylize_interrupted)
    monkeypatch.setattr(sys, "argv", ["ultrastyle", "models", "list"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 130 and capsys.readouterr().err == "the command's own line\n"


def test_help_shows_flags_without_a_value_they_do_not_take():
    """typer writes ``--skip-existing <bool>``, which reads as a flag taking a value (``--skip-existing true``: a content)."""
    from ultrastyle.cli.main import app
    from ultrastyle.cli.models import app as models_app

    commands = [[c.name] for c in app.registered_commands] + [["models", c.name] for c in models_app.registered_commands]
    for argv in ([], ["models"], *commands):
        r = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "--help" in r.output, (argv, r.output)
        assert "<bool>" not in r.output, argv
    r = CliRunner().invoke(app, ["stylize", "--help"], env={"COLUMNS": "200"})
    assert "--skip-existing" in r.output and "<int" in r.output  # options that take a value keep their type


def test_a_non_ascii_path_printed_into_a_pipe_of_a_narrower_encoding_is_escaped_not_a_crash(tmp_path):
    """Windows prints into a file or pipe in its ANSI code page, strictly: the summary raised after the work was done."""
    import os
    import subprocess

    home = tmp_path / "données-出力"
    env = {**os.environ, "ULTRASTYLE_HOME": str(home), "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([sys.executable, "-m", "ultrastyle", "models", "path", "cd-wct-16x"], capture_output=True, text=True, env=env,
                       encoding="ascii", errors="replace", timeout=120)  # fmt: skip
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    assert "donn\\xe9es-\\u51fa\\u529b" in r.stdout + r.stderr


def test_a_library_warning_outside_a_commands_report_is_one_line_with_its_flag(capsys):
    import warnings

    from ultrastyle.cli.entry import _show_warning
    from ultrastyle.errors import Setting, remedied

    _show_warning(remedied(UserWarning("tiles smaller than asked: raise it (tile_min)"), Setting("tile_min")), UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "warning: tiles smaller than asked: raise it (--tile-min)\n"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _show_warning(DeprecationWarning("old"), DeprecationWarning, "x.py", 7)  # not ours to reword: Python's form
    assert "x.py:7: DeprecationWarning: old" in capsys.readouterr().err


@pytest.mark.parametrize("wide", [False, True])
def test_help_names_every_flag_whole_in_a_log_and_on_a_wide_terminal(wide, monkeypatch):
    """A review: at 80 columns (a pipe, a log) rich's panels cut flag names (``--checkpoint-eve…``) and wrapped help 17
    columns wide; there the help is Click's plain text now, and rich's panels only from `RICH_HELP_MIN_WIDTH` columns."""
    import click

    from ultrastyle.cli import main

    monkeypatch.setattr(main, "_wide_terminal", lambda stream: wide)
    group = typer.main.get_command(main.app)
    commands = [([name], cmd) for name, cmd in group.commands.items() if not isinstance(cmd, click.Group)]
    commands += [(["models", name], cmd) for name, cmd in group.commands["models"].commands.items()]
    assert len(commands) > 10
    for argv, cmd in commands:
        r = CliRunner().invoke(main.app, [*argv, "--help"], env={"COLUMNS": str(main.RICH_HELP_MIN_WIDTH if wide else 80)})
        assert r.exit_code == 0, (argv, r.output)
        assert ("╭" in r.output) == wide, argv  # rich's panels, or plain text
        assert "…" not in r.output, (argv, [line for line in r.output.splitlines() if "…" in line])
        assert "\\[" not in r.output, (argv, [line for line in r.output.splitlines() if "\\[" in line])  # rich's escapes shown as typed
        for param in cmd.params:
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("-"):
                    assert re.search(rf"(^|[\s,/]){re.escape(flag)}($|[\s,=])", r.output, re.M), (argv, flag)
