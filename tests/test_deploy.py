"""The deployment half from Python (`ultrastyle.export_model`, `calibrate`, `check_tensorrt`, `build_tensorrt`), as the CLI runs it."""

from __future__ import annotations

import numpy as np
import pytest

import ultrastyle
from ultrastyle.export.bundle import BundleError
from ultrastyle.models.zoo import sha256_file
from ultrastyle.options import OptionError


@pytest.fixture(scope="module")
def bundle(cd16x_dir, tmp_path_factory):
    return ultrastyle.export_model(cd16x_dir, tmp_path_factory.mktemp("deploy") / "b", stages=[1])


def test_export_model_records_the_stages_and_source_weights(bundle, cd16x_dir):
    assert bundle.stages == (1,) and sorted(bundle.manifest["networks"]) == ["decoder1", "decoder_affine1", "decoder_folded1", "encoder1"]
    assert bundle.manifest["source_weights"]["1SE.pth"] == sha256_file(cd16x_dir / "1SE.pth")  # what `ultrastyle export` records
    assert all(v["max_abs_diff"] < 1e-3 for v in bundle.manifest["validation"].values())


def test_export_model_refuses_a_folder_that_is_not_a_bundle_before_loading(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        ultrastyle.export_model("no-such-model", tmp_path)  # refused before the name is looked up
    with pytest.raises(OptionError, match="expected an integer 13..21, got 5") as info:
        ultrastyle.export_model("no-such-model", tmp_path / "b", opset=5)  # refused before the model is looked up
    assert info.value.option == "opset"
    for stages in ([], "one", [7]):
        with pytest.raises(OptionError, match="stage numbers 1..5") as info:
            ultrastyle.export_model("no-such-model", tmp_path / "b", stages=stages)
        assert info.value.option == "stages"


def test_export_model_names_the_stages_a_model_has_before_anything_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ULTRASTYLE_MIRROR", "http://127.0.0.1:9/nowhere")
    with pytest.raises(OptionError, match=r"ultrastyle-adain-16x has no stage\(s\) \[5\]; it has \[4\]") as info:
        ultrastyle.export_model("ultrastyle-adain-16x", tmp_path / "b", stages="5")
    assert info.value.option == "stages" and not (tmp_path / "b").exists()


def test_calibrate_takes_settings_as_keywords_and_names_a_typo(bundle, shared_dir, tmp_path):
    import shutil

    images = shared_dir / "images" / "train"
    with pytest.raises(OptionError, match="did you mean 'samples'") as info:
        ultrastyle.calibrate(bundle, images, sample=2)
    assert info.value.option == "sample"
    with pytest.raises(OptionError) as info:
        ultrastyle.calibrate(bundle, images, keep_float="everything")
    assert info.value.option == "keep_float" and info.value.message.startswith("expected one of")  # the name once, not twice
    for kw in ({"tile": 0}, {"tile": -4}, {"image_size": 0}, {"samples": "8"}, {"percentile": 200}, {"per_channel": "yes"}, {"seed": 1.5}):
        with pytest.raises(OptionError) as info:  # the limits the command line has, from Python too
            ultrastyle.calibrate(bundle, images, **kw)
        assert info.value.option == next(iter(kw)), info.value
    shutil.copytree(bundle.path, tmp_path / "b")
    out = ultrastyle.calibrate(tmp_path / "b", images, samples=1, tile=64, image_size=128, activations="int8")
    entry = out.manifest["networks"]["encoder1"]["int8"]
    assert entry["settings"]["activations"] == "int8" and (out.path / entry["file"]).is_file()
    assert ultrastyle.check_tensorrt(out, precision="int8").ok  # signed Q/DQ graphs: what TensorRT builds
    files = sorted(images.glob("*.jpg"))[:3]  # a list of files, as calibrate_bundle takes (a raw TypeError once)
    listed = ultrastyle.calibrate(tmp_path / "b", files, samples=2, tile=64, image_size=128, stages=[1])
    assert listed.manifest["calibration"]["images"] == [f.name for f in files[:2]]
    with pytest.raises(ultrastyle.CalibrationDataError, match="no calibration images given"):
        ultrastyle.calibrate(tmp_path / "b", [], stages=[1])


def test_check_tensorrt_reports_profiles_and_refuses_bad_tiles(bundle):
    report = ultrastyle.check_tensorrt(bundle, tile_max=512)
    assert report.ok and report.graphs >= 4 and report.ranges[1].max == 512 and report.bundle == bundle.path
    with pytest.raises(OptionError, match="tile_min=900 is above tile_max=512") as info:
        ultrastyle.check_tensorrt(bundle, tile_min=900, tile_max=512)
    assert info.value.option == "tile_min"
    with pytest.raises(OptionError, match=r"no stage\(s\) \[3\]") as info:
        ultrastyle.check_tensorrt(bundle, stages=[3])
    assert info.value.option == "stages"
    for stages in ("1", 1, [1, 1]):  # one stage, as a string, a number or twice: the same
        assert ultrastyle.check_tensorrt(bundle, stages=stages).ranges.keys() == {1}
    for stages in ([], [7], "one", "1,,2"):
        with pytest.raises(OptionError) as info:
            ultrastyle.check_tensorrt(bundle, stages=stages)
        assert info.value.option == "stages" and "stage numbers 1..5" in str(info.value), info.value
    with pytest.raises(OptionError):
        ultrastyle.check_tensorrt(bundle, precision="int4")
    for kw in ({"tile_max": 0}, {"tile_min": -64}, {"workspace": "0GB"}, {"workspace": "lots"}):  # before TensorRT is looked for
        with pytest.raises(OptionError) as info:
            ultrastyle.build_tensorrt(bundle, **kw)
        assert info.value.option == next(iter(kw)), info.value
    assert not ultrastyle.check_tensorrt(bundle, precision="int8").ok  # no int8 graphs yet: a finding, not an exception


def test_build_tensorrt_without_tensorrt_says_what_is_missing(bundle):
    from ultrastyle.trt.env import TensorRTUnavailable, missing_for_tensorrt

    missing = missing_for_tensorrt()  # the package alone is not enough: a CUDA binding and a GPU too
    if not missing:
        pytest.skip("TensorRT, a CUDA binding and a GPU are all here: the build would run")
    with pytest.raises(TensorRTUnavailable, match="TensorRT") as info:
        ultrastyle.build_tensorrt(bundle)
    assert all(m in str(info.value) for m in missing), (missing, str(info.value))
    with pytest.raises(OptionError) as info:
        ultrastyle.build_tensorrt(bundle, workspace="lots")
    assert info.value.option == "workspace"


def test_the_bundle_export_model_returns_is_a_model_to_stylize_with(bundle):
    content = np.full((40, 48, 3), 120, np.uint8)
    style = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (40, 1, 3))
    by_path = ultrastyle.stylize(content, style, model=bundle.path, levels=(1,))
    assert np.array_equal(ultrastyle.stylize(content, style, model=bundle, levels=(1,)), by_path)
    with ultrastyle.load(bundle) as s:
        assert s.model == str(bundle.path) and np.array_equal(s.stylize(content, style, levels=(1,)), by_path)


def test_check_tensorrt_takes_a_zoo_name_as_calibrate_does_and_names_an_unknown_one(cd16x_dir):
    import ultrastyle
    from ultrastyle.models import zoo

    zoo.import_local("cd-wct-16x", cd16x_dir)
    report = ultrastyle.check_tensorrt("cd-wct-16x", stages=5)  # "no such folder; create one with ultrastyle export" before
    assert report.ok and report.bundle.parent == zoo.bundles_dir()
    with pytest.raises(ultrastyle.ZooError, match="did you mean 'cd-wct-16x'"):
        ultrastyle.check_tensorrt("cd-wct16x")


def test_building_a_zoo_model_without_tensorrt_says_so_before_exporting_it(cd16x_dir):
    import ultrastyle
    from ultrastyle.models import zoo
    from ultrastyle.trt.env import missing_for_tensorrt

    if not missing_for_tensorrt():
        pytest.skip("TensorRT, a CUDA binding and a GPU are all here: the build would run")
    zoo.import_local("cd-wct-16x", cd16x_dir)
    with pytest.raises(ultrastyle.RunnerError, match="building TensorRT engines needs") as info:
        ultrastyle.build_tensorrt("cd-wct-16x", precision="FP16")
    assert "check_tensorrt('cd-wct-16x')" in str(info.value)
    assert not zoo.bundles_dir().exists() or not any(zoo.bundles_dir().iterdir())  # nothing exported for a build that cannot run
    with pytest.raises(ultrastyle.UnknownModelError, match="unknown model 'cd-wct16x'; did you mean 'cd-wct-16x'"):
        ultrastyle.build_tensorrt("cd-wct16x")  # it said TensorRT was missing and to check_tensorrt('cd-wct16x'), refused then


def test_tilde_is_the_home_folder_for_exports_calibration_images_and_the_optimizers_model(cd16x_dir, shared_dir, tmp_path, monkeypatch):
    import shutil

    from ultrastyle.calibration.data import calibration_images

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "photos").mkdir(parents=True)
    work.mkdir()
    shutil.copy(shared_dir / "images/content/cd_content_in1.jpg", home / "photos" / "a.jpg")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    made = ultrastyle.export_model(str(cd16x_dir), "~/bundle", stages=5)  # a literal ./~/bundle was made
    assert made.path == home / "bundle" and list(work.iterdir()) == []
    assert ultrastyle.check_tensorrt("~/bundle", precision="fp32").bundle == home / "bundle"
    assert calibration_images("~/photos") == [home / "photos" / "a.jpg"]  # "no such folder"
    shutil.copytree(cd16x_dir, home / "model")
    from ultrastyle.optimization.run import Optimizer

    assert Optimizer("~/model").model == str(home / "model")  # an unknown zoo model
