"""Ctrl-C outside a command's own reporting: one line and exit 130, never silence or a traceback."""

from __future__ import annotations

import importlib.abc
import sys

import pytest
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
