"""`doctor`, `build` and `stylize --backend tensorrt` from the command line, with and without TensorRT."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import test_trt_fakes as fakes
from ultrastyle.cli.main import app
from ultrastyle.trt.env import missing_for_tensorrt

NO_TRT = pytest.mark.skipif(
    not missing_for_tensorrt(),
    reason="TensorRT, a CUDA binding and a GPU are all here, so the messages of a machine that lacks one cannot be produced",
)


@pytest.fixture
def images(tmp_path, shared_dir):
    with Image.open(shared_dir / "images/content/cd_content_in4.jpg") as im:
        im.convert("RGB").resize((131, 90), Image.Resampling.LANCZOS).save(tmp_path / "c.png")
    return tmp_path / "c.png", shared_dir / "images/style/cd_style_in3.jpg"


def test_doctor_reports_every_component_and_exits_0_without_a_gpu():
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0, r.output
    for name in ("ultrastyle", "python", "memory", "torch", "onnxruntime", "libvips", "ray", "tensorrt", "cuda-python", "pycuda"):
        assert name in r.output
    assert "gpu" in r.output and "backends:" in r.output
    assert "transparent huge pages" in " ".join(r.output.split())  # the memory row (rich may wrap it)
    if missing_for_tensorrt():
        assert "pip install 'ultrastyle[tensorrt]'" in r.output


@NO_TRT
def test_stylize_backend_tensorrt_without_tensorrt_exits_2_with_one_message(images, tmp_path):
    content, style = images
    r = CliRunner().invoke(app, ["stylize", str(content), str(style), "--backend", "tensorrt", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the TensorRT backend needs"), r.output
    assert "tensorrt package" in r.output and "NVIDIA GPU" in r.output and "--backend onnxruntime" in r.output
    assert not (tmp_path / "o").exists()


@NO_TRT
def test_build_without_tensorrt_exits_1_and_points_to_check(tmp_path, cd16x_dir):
    from ultrastyle.export.bundle import export_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder

    b = export_bundle(load_cd_folder(cd16x_dir, stages=(1,)), tmp_path / "b", validate=False, spec=ExportSpec(stages=(1,)))
    r = CliRunner().invoke(app, ["build", str(b.path), "--stages", "1"])
    assert r.exit_code == 2 and "building TensorRT engines needs" in r.output and "--check" in r.output  # refused before any work


def test_precision_fp16_needs_tensorrt(images, tmp_path):
    content, style = images
    r = CliRunner().invoke(app, ["stylize", str(content), str(style), "--backend", "onnxruntime", "--precision", "fp16", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "does not run on the onnxruntime backend" in r.output and "tensorrt backend" in r.output and "--precision fp32" in r.output


def test_stylize_on_tensorrt_matches_onnxruntime(images, cd16x_dir, tmp_path, monkeypatch):
    # With the ONNX Runtime-backed stand-in for TensorRT: the CLI path (engines built on first use,
    # tiles fitted to the profiles, device-side statistics) gives ONNX Runtime's image.
    content, style = images
    outs = {}
    for backend in ("onnxruntime", "tensorrt"):
        if backend == "tensorrt":
            fakes.install(monkeypatch)
        r = CliRunner().invoke(app, ["stylize", str(content), str(style), "--model", str(cd16x_dir), "--style-size", "96",
                                     "--max-memory", "256MB", "--backend", backend, "-o", str(tmp_path / backend)])  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[backend] = np.asarray(Image.open(tmp_path / backend / "c_stylized_cd_style_in3.png"), np.int16)
        if backend == "tensorrt":
            assert "first use" in r.output
    assert np.abs(outs["onnxruntime"] - outs["tensorrt"]).max() <= 1


@pytest.mark.parametrize(("damage", "flags"), [("flip", []), ("truncate", []), ("flip", ["--no-baseline"]), ("remove", ["--no-baseline"])])
def test_doctor_names_a_damaged_default_model_once_as_the_command_and_exits_1(cd16x_dir, tmp_path, monkeypatch, damage, flags):
    from ultrastyle.models import zoo

    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    d = zoo.import_local("cd-wct-16x", cd16x_dir)
    data = bytearray((d / "4SE.pth").read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF  # same size: only its sha256 tells
        (d / "4SE.pth").write_bytes(bytes(data))
    elif damage == "truncate":  # stylize calls it damaged; doctor once called it "not installed" and the setup ready
        (d / "4SE.pth").write_bytes(bytes(data[:-10]))
    else:  # an interrupted install: 9 of 10 files
        (d / "4SE.pth").unlink()
    assert zoo.install_status("cd-wct-16x") == ("incomplete" if damage == "remove" else "damaged")
    r = CliRunner().invoke(app, ["doctor", *flags])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "not ready: 1 problem(s) above (model cd-wct-16x)" in text, text
    assert "ultrastyle models fetch cd-wct-16x" in text and "ultrastyle.models.zoo" not in text and "ready;" not in text, text


def test_doctor_calls_a_cache_it_cannot_install_into_unusable(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "afile"))  # "fetched on first use", said doctor; stylize then failed
    r = CliRunner().invoke(app, ["doctor", "--no-baseline"])
    text = "".join(r.output.split())  # a long path folds across lines
    assert r.exit_code == 1 and f"cannotbemade:{tmp_path / 'afile'}isafile;setULTRASTYLE_HOMEtoafolderyoucanwrite" in text, text


def test_a_damaged_cached_bundle_is_reported_with_what_a_repair_would_delete_and_left_alone(cd16x_dir, tmp_path, monkeypatch):
    """`doctor` measured its baseline through a run, which exported the damaged bundle again and deleted its int8 graphs."""
    from ultrastyle.models import zoo
    from ultrastyle.runtime.backends.select import cache_repair_loss, ensure_bundle

    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    zoo.import_local("cd-wct-16x", cd16x_dir)
    bundle = ensure_bundle("cd-wct-16x", stages=(5,), progress=False)
    assert cache_repair_loss("cd-wct-16x", (5,)) is None
    graph = bundle.path / "encoder5.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    assert cache_repair_loss("cd-wct-16x", (5,)) is None  # damaged, but a repair deletes nothing: the next run just exports
    (bundle.path / "encoder5.int8.onnx").write_bytes(b"calibrated")
    said = cache_repair_loss("cd-wct-16x", (5,))
    assert said is not None and f"the cached bundle {bundle.path} is damaged" in said and said.endswith("deleting the 1 int8 graph it holds")
    assert (bundle.path / "encoder5.int8.onnx").read_bytes() == b"calibrated"  # nothing exported or deleted to find out

    import ultrastyle.runtime.backends.select as select
    import ultrastyle.runtime.memory as memory
    from ultrastyle.checkup import baseline_checks

    measured: list[str] = []
    monkeypatch.setattr(memory, "measure_baseline", lambda model, backend: measured.append(backend) or 2**29)
    monkeypatch.setattr(select, "cache_repair_loss", lambda model: said if model == "cd-wct-16x" else None)  # as for stages 1-5
    rows = {r.what: r for r in baseline_checks("cd-wct-16x")}
    assert measured == ["torch"] and rows["baseline (torch)"].status == "info"  # the run that would have deleted them is not made
    assert rows["baseline (onnxruntime)"].status == "missing" and said in rows["baseline (onnxruntime)"].detail


def test_python_doctor_gives_the_checks_the_command_prints_with_fixes_as_calls(cd16x_dir, tmp_path, monkeypatch):
    import ultrastyle
    from ultrastyle.errors import Remedy, remedies_of
    from ultrastyle.models import zoo

    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    checks = ultrastyle.doctor()
    assert {"python", "memory", "torch", "onnxruntime", "tensorrt"} <= {c.what for c in checks}
    model = next(c for c in checks if c.what == "model cd-wct-16x")
    assert model.status == "missing" and model.blocking and ultrastyle.ready(checks)  # fetched on first use: not a problem
    d = zoo.import_local("cd-wct-16x", cd16x_dir)
    assert next(c for c in ultrastyle.doctor() if c.blocking).status == "ok"
    (d / "4SE.pth").write_bytes((d / "4SE.pth").read_bytes()[:-10])
    checks = ultrastyle.doctor()
    bad = [c for c in checks if c.blocking and c.status == "unusable"]
    assert not ultrastyle.ready(checks) and [c.what for c in bad] == ["model cd-wct-16x"]
    assert "ultrastyle.fetch_model('cd-wct-16x')" in bad[0].detail and "ultrastyle models fetch" not in bad[0].detail  # Python's words
    assert Remedy("fetch_model", ("cd-wct-16x",)) in remedies_of(bad[0].remedy)
    unknown = ultrastyle.doctor("no-such-model")[-1]
    assert unknown.status == "unusable" and "unknown model 'no-such-model'" in unknown.detail
    r = CliRunner().invoke(app, ["doctor", "--no-baseline", "--model", "no-such-model"])
    assert r.exit_code == 1 and "ultrastyle models list" in " ".join(r.output.split()), r.output


def test_doctor_does_not_measure_a_model_that_does_not_stylize():
    """`doctor --model cd-16x-pruned-base` (a start for training) called both baselines unusable: 'not ready'."""
    import ultrastyle
    from ultrastyle.checkup import baseline_checks

    (only,) = baseline_checks("cd-16x-pruned-base")
    assert only.status == "info" and not only.blocking and "a start for training" in only.detail
    assert ultrastyle.ready([only])


def test_doctor_says_what_ray_and_zarr_allow_and_the_cli_prints_its_version():
    from ultrastyle import __version__
    from ultrastyle.checkup import _ray_check

    versions = {"ray": None, "zarr": None}
    assert _ray_check(versions.get).status == "missing" and "pip install 'ultrastyle[ray]'" in _ray_check(versions.get).detail
    versions["ray"] = "2.60.0"
    assert "needs zarr 3, but zarr is not installed" in _ray_check(versions.get).detail
    versions["zarr"] = "2.18.3"
    assert "but zarr 2.18.3 is installed" in _ray_check(versions.get).detail
    versions["zarr"] = "3.1.6"
    check = _ray_check(versions.get)
    assert check.status == "ok" and "ray 2.60.0, zarr 3.1.6" in check.detail and "needs" not in check.detail
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"ultrastyle {__version__}"


def test_doctor_in_a_narrow_terminal_keeps_paths_and_commands_whole():
    """A review: at 40 columns the details column split install commands and paths mid-word ('ultrastyle[t' / 'ensorrt]')."""
    from ultrastyle.cli.doctor import NARROW

    r = CliRunner().invoke(app, ["doctor", "--no-baseline"], env={"COLUMNS": "40"})
    lines = r.output.splitlines()
    assert 40 < NARROW and lines[0].startswith("ultrastyle: ok"), r.output  # one block per check, not the table
    assert any(sys.executable in line for line in lines), r.output  # a path on one line, to copy
    assert "  pip install 'ultrastyle[tensorrt]'" in lines, r.output  # a command too
    details = [line for line in lines if line.startswith("  ")]
    assert details and all(len(line) < 40 or " " not in line.strip() for line in details), details  # wrapped between words
    wide = CliRunner().invoke(app, ["doctor", "--no-baseline"], env={"COLUMNS": "120"})
    assert wide.output.split()[:3] == ["component", "status", "details"], wide.output  # the table where it fits
