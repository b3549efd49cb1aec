"""`ultrastyle --help` and `ultrastyle COMMAND --help` stay cheap: no torch, onnx or onnxruntime is imported.

Typer builds every command (signatures and defaults) for any invocation, so
whatever a command module imports at module level is paid by every help text
and every early refusal. The command modules import the library inside their
functions; what the signatures need comes from torch-free modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "onnx", "onnxruntime")

_PROBE = textwrap.dedent(
    """
    import json, sys

    HEAVY = {heavy!r}

    def loaded():
        return [m for m in HEAVY if m in sys.modules]

    report = {{"import": loaded()}}
    import typer
    from typer.testing import CliRunner

    import ultrastyle.cli.main as cli

    report["import"] = loaded()

    def commands(cmd, path):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {{}}).items()):
            yield from commands(sub, [*path, name])

    paths = list(commands(typer.main.get_command(cli.app), []))
    report["paths"] = [" ".join(p) for p in paths]
    report["help"] = {{}}
    for path in paths:
        result = CliRunner().invoke(cli.app, [*path, "--help"])
        report["help"][" ".join(path)] = {{"exit": result.exit_code, "usage": "Usage:" in result.output, "loaded": loaded()}}
    print(json.dumps(report))
    """
).format(heavy=HEAVY)


def test_help_of_every_command_imports_no_torch_onnx_or_onnxruntime():
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert not report["import"], f"importing ultrastyle.cli.main imports {report['import']}"
    # Every command and sub-command is covered (the list grows with the app).
    assert {"", "stylize", "optimize", "export", "calibrate", "build", "distill", "train-decoder", "doctor", "models", "models list"} <= set(report["paths"])
    for path, seen in report["help"].items():
        shown = f"ultrastyle {path} --help".replace("  ", " ")
        assert seen["exit"] == 0 and seen["usage"], f"{shown}: exit {seen['exit']}"
        assert not seen["loaded"], f"{shown} imports {seen['loaded']}"
