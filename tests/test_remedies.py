"""Fixes that errors suggest: Python in library messages, the command on the command line (`cli.remedies`)."""

from __future__ import annotations

import pytest

from ultrastyle.cli.remedies import COMMANDS, as_command, command
from ultrastyle.errors import Placeholder, Remedy, RunnerError, remedied


def test_a_remedy_reads_as_python_and_as_the_command():
    fix = Remedy("build_tensorrt", ("b/",), (("precision", "fp16"), ("tile_min", Placeholder("N")), ("force", True)))
    assert fix.python() == "ultrastyle.build_tensorrt('b/', precision='fp16', tile_min=N, force=True)"
    assert command(fix) == "ultrastyle build b/ --precision fp16 --tile-min N --force"
    assert command(Remedy("calibrate", ("b/", "photos/"), (("activations", "int8"),))) == "ultrastyle calibrate b/ --images photos/ --activations int8"


def test_the_cli_swaps_the_call_for_the_command_and_leaves_other_errors_alone():
    fix = Remedy("models.zoo.fetch", ("cd-wct-16x",), (("mirror", "URL"),))
    exc = remedied(RunnerError(f"could not download; fetch it from a mirror: {fix.python()}"), fix)
    assert as_command(exc) == "could not download; fetch it from a mirror: ultrastyle models fetch cd-wct-16x --mirror URL"
    assert as_command(RunnerError("plain")) == "plain"


def test_an_error_may_carry_several_fixes_and_each_becomes_a_command():
    online, offline = Remedy("models.zoo.fetch", ("m",)), Remedy("models.zoo.import_local", ("m", Placeholder("DIR")))
    exc = remedied(RunnerError(f"install it: {online.python()}  (offline: {offline.python()})"), (online, offline))
    assert str(exc) == "install it: ultrastyle.models.zoo.fetch('m')  (offline: ultrastyle.models.zoo.import_local('m', DIR))"
    assert as_command(exc) == "install it: ultrastyle models fetch m  (offline: ultrastyle models import m DIR)"


@pytest.mark.parametrize("argv", [
    ["stylize", "c.jpg", "--style", "s.jpg", "-m", "nosuch", "-o", "out"],
    ["optimize", "c.jpg", "--style", "s.jpg", "-m", "nosuch", "-o", "out"],
    ["export", "nosuch", "-o", "bundle"],
    ["calibrate", "nosuch", "--images", "photos"],
    ["models", "path", "nosuch"],
])  # fmt: skip
def test_an_unknown_model_points_at_models_list_on_the_command_line(argv, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    for name in ("c.jpg", "s.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.png").write_bytes(b"")
    r = CliRunner().invoke(app, argv)
    text = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: unknown model 'nosuch'"), r.stderr  # one line: no blank line from a progress bar before it
    assert "(described by ultrastyle models list)" in text and "ultrastyle.models" not in text, text


@pytest.mark.parametrize("function", sorted(COMMANDS))
def test_every_command_remedy_names_a_public_function(function):
    import importlib

    module, _, name = f"ultrastyle.{function}".rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))  # the Python the message shows exists


def test_an_int8_runner_without_int8_graphs_suggests_calibrate(tmp_path, cd16x_dir):
    from ultrastyle.export.bundle import export_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder
    from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

    bundle = export_bundle(load_cd_folder(cd16x_dir, stages=(5,)), tmp_path / "b", spec=ExportSpec(stages=(5,)), validate=False)
    with pytest.raises(RunnerError, match=r"make them with ultrastyle.calibrate\(") as info:
        OnnxRuntimeRunner(bundle, precision="int8")
    assert as_command(info.value).endswith(f"ultrastyle calibrate {bundle.path} --images YOUR_PHOTOS/")


def test_the_command_line_prints_the_fix_as_a_command(tmp_path, cd16x_dir, shared_dir):
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app
    from ultrastyle.export.bundle import export_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder

    bundle = export_bundle(load_cd_folder(cd16x_dir, stages=(5,)), tmp_path / "b", spec=ExportSpec(stages=(5,)), validate=False)
    content = shared_dir / "images" / "content" / "cd_content_in1.jpg"
    style = shared_dir / "images" / "style" / "cd_style_in1.jpg"
    r = CliRunner().invoke(app, ["stylize", str(content), "--style", str(style), "-m", str(bundle.path), "--precision", "int8", "-o", str(tmp_path / "o")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"ultrastyle calibrate {bundle.path} --images YOUR_PHOTOS/" in text and "ultrastyle.calibrate(" not in text, text


def test_a_missing_int8_graph_keeps_its_calibrate_remedy_through_the_runner(tmp_path, cd16x_dir):
    import json

    from ultrastyle.export.bundle import MANIFEST, export_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder
    from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

    bundle = export_bundle(load_cd_folder(cd16x_dir, stages=(5,)), tmp_path / "b", spec=ExportSpec(stages=(5,)), validate=False)
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    manifest["networks"]["encoder5"]["int8"] = {"file": "encoder5.int8.onnx", "sha256": "0" * 64}  # listed, never written
    (bundle.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RunnerError, match="the int8 graph of encoder5 is missing") as info:
        OnnxRuntimeRunner(bundle.path, precision="int8")
    assert as_command(info.value).endswith(f"calibrate again: ultrastyle calibrate {bundle.path} --images YOUR_PHOTOS/")
