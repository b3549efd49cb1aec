"""Fixes that errors suggest: Python in library messages, the command on the command line (`cli.remedies`)."""

from __future__ import annotations

import pickle
import re

import pytest

from ultrastyle.cli.remedies import COMMANDS, as_command, command, flag
from ultrastyle.errors import Placeholder, Remedy, RunnerError, Setting, remedied


def test_a_remedy_reads_as_python_and_as_the_command():
    fix = Remedy("build_tensorrt", ("b/",), (("precision", "fp16"), ("tile_min", Placeholder("N")), ("force", True)))
    assert fix.python() == "ultrastyle.build_tensorrt('b/', precision='fp16', tile_min=N, force=True)"
    assert command(fix) == "ultrastyle build b/ --precision fp16 --tile-min N --force"
    assert command(Remedy("calibrate", ("b/", "photos/"), (("activations", "int8"),))) == "ultrastyle calibrate b/ --images photos/ --activations int8"


def test_every_remedy_the_cli_knows_is_a_public_name_of_the_package():
    # A message's Python fix must run as printed: `ultrastyle.models.zoo.fetch(...)` once failed (no such attribute).
    import ultrastyle

    assert COMMANDS
    for function in COMMANDS:
        assert "." not in function and callable(getattr(ultrastyle, function)), function
        assert function in ultrastyle.__all__ and getattr(ultrastyle, function).__doc__, function


def test_the_cli_swaps_the_call_for_the_command_and_leaves_other_errors_alone():
    fix = Remedy("fetch_model", ("cd-wct-16x",), (("mirror", "URL"),))
    exc = remedied(RunnerError(f"could not download; fetch it from a mirror: {fix.python()}"), fix)
    assert as_command(exc) == "could not download; fetch it from a mirror: ultrastyle models fetch cd-wct-16x --mirror URL"
    assert as_command(RunnerError("plain")) == "plain"


def test_an_error_may_carry_several_fixes_and_each_becomes_a_command():
    online, offline = Remedy("fetch_model", ("m",)), Remedy("import_model", ("m", Placeholder("DIR")))
    exc = remedied(RunnerError(f"install it: {online.python()}  (offline: {offline.python()})"), (online, offline))
    assert str(exc) == "install it: ultrastyle.fetch_model('m')  (offline: ultrastyle.import_model('m', DIR))"
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
    from PIL import Image

    for name in ("c.jpg", "s.jpg"):  # readable: what is refused before the model opens is not the point here
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.png").write_bytes(b"")
    r = CliRunner().invoke(app, argv)
    text = " ".join(r.stderr.split())
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: unknown model 'nosuch'"), r.stderr  # one line: no blank line from a progress bar before it
    assert "(described by ultrastyle models list)" in text and "ultrastyle.models" not in text, text


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
    assert as_command(info.value).endswith(f"calibrate again: ultrastyle calibrate {bundle.path} --images YOUR_PHOTOS/ --activations int8")


@pytest.mark.parametrize(("setting", "python", "cli"), [
    (Setting("max_pixels"), "(max_pixels)", "(--max-pixels)"),
    (Setting("resume", True), "resume=True", "--resume"),
    (Setting("stages", None), "stages=None", "leave out --stages"),
    (Setting("levels", [5, 4]), "levels=[5, 4]", "--levels 5,4"),
    (Setting("threads", 99), "threads=99", "--threads 99"),
    (Setting("address", "local"), "address='local'", "--ray local"),  # a keyword whose flag is another word
])  # fmt: skip
def test_a_setting_reads_as_the_keyword_in_python_and_as_the_flag_on_the_command_line(setting, python, cli):
    assert setting.python() == python
    assert flag(setting, {"address": "--ray"}) == cli
    exc = remedied(RunnerError(f"it failed; fix it ({python}) and rerun"), setting)
    assert as_command(exc, flags={"address": "--ray"}) == f"it failed; fix it ({cli}) and rerun"
    assert pickle.loads(pickle.dumps(setting)) == setting  # Ray workers send it to the driver


def test_a_setting_swaps_only_its_own_keyword_and_value():
    exc = remedied(RunnerError("threads=999 is too many, and threads=99 too; (max_pixels) is not --max_pixels (max_pixels_x)"),
                   (Setting("threads", 99), Setting("max_pixels")))  # fmt: skip
    assert as_command(exc) == "threads=999 is too many, and --threads 99 too; (--max-pixels) is not --max_pixels (max_pixels_x)"


def test_a_call_and_a_setting_on_one_error_are_each_shown_as_the_command_line_says_them():
    fix = Remedy("calibrate", ("b/", Placeholder("PHOTOS/")), (("stages", [3]),))
    exc = remedied(RunnerError(f"calibrate again: {fix.python()}, or every stage (stages=None)"), (fix, Setting("stages", None)))
    assert as_command(exc) == "calibrate again: ultrastyle calibrate b/ --images PHOTOS/ --stages 3, or every stage (leave out --stages)"


@pytest.mark.parametrize(("argv", "said", "exit_code"), [
    (["--threads", "100000"], "Invalid value for --threads: 100000 threads are more than 4 per core", 2),
    (["--backend", "onnxruntime", "--compile"], "--compile runs the torch backend", 2),
    (["-o", "result.png"], "and the format separately (--format)", 2),
    (["--max-pixels", "1000"], "(--max-pixels); raise the limit", 2),  # the style every output needs: refused before any work
    (["--max-pixels", "200000"], "style /", 2),  # the content (420 x 420) fits, the style does not: its error names the flag too
])  # fmt: skip
def test_stylize_names_its_flags_where_the_library_names_keywords(argv, said, exit_code, tmp_path, cd16x_dir, shared_dir, monkeypatch):
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    monkeypatch.chdir(tmp_path)
    content = shared_dir / "images" / "content" / "cd_content_in2.jpg"  # 420 x 420
    style = shared_dir / "images" / "style" / "cd_style_in1.jpg"  # larger
    argv = ["stylize", str(content), "--style", str(style), "-m", str(cd16x_dir), "--levels", "5", *argv]
    r = CliRunner().invoke(app, argv if "-o" in argv else [*argv, "-o", "out"])
    text = " ".join(r.output.replace("│", " ").split())  # a usage error comes in a box
    assert r.exit_code == exit_code and said in text, text
    assert "(--max-pixels); raise the limit" in text or "--max-pixels" not in argv, text
    assert not re.search(r"\b(threads|compile|max_pixels|format)=|\(max_pixels\)|\(format\)", text), text  # no library keyword is left
