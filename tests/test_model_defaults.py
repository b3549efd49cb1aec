"""Per-model defaults (method, levels, alpha) and models with fewer than five stages."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_convert import ADAIN_DEC_SHAPES, ADAIN_VGG_SHAPES
from test_zoo import NAME, TempRegistry, entry_json, real_entry, registry  # noqa: F401  (registry: a fixture)

from ultrastyle.core.arch import ARCHS
from ultrastyle.export.bundle import read_bundle
from ultrastyle.models import zoo
from ultrastyle.models.convert import CheckpointError
from ultrastyle.models.defaults import DEFAULT_ALPHA, ModelDefaults, ModelDefaultsError
from ultrastyle.models.pretrained import load_model
from ultrastyle.models.sources import folder_arch, model_defaults, write_folder_defaults
from ultrastyle.runtime import cascade
from ultrastyle.runtime.backends.select import ensure_bundle, open_runner, weights_digest


@pytest.fixture
def adain_dir(tmp_path: Path) -> Path:
    """A pytorch-AdaIN folder: vgg_normalised.pth + decoder.pth, random tensors of the published shapes."""
    g = torch.Generator().manual_seed(2)

    def conv(cout: int, cin: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Variance-preserving scale, so images stay near [0, 1] and the export's tolerances apply.
        return torch.randn(cout, cin, k, k, generator=g) * (cin * k * k) ** -0.5, torch.randn(cout, generator=g) * 0.01

    vgg = {}
    for i, (cout, cin, k) in ADAIN_VGG_SHAPES.items():
        vgg[f"{i}.weight"], vgg[f"{i}.bias"] = conv(cout, cin, k)
    dec = {}
    for i, (cout, cin) in ADAIN_DEC_SHAPES.items():
        dec[f"{i}.weight"], dec[f"{i}.bias"] = conv(cout, cin, 3)
    d = tmp_path / "adain"
    d.mkdir()
    torch.save(vgg, d / "vgg_normalised.pth")
    torch.save(dec, d / "decoder.pth")
    return d


@pytest.fixture
def one_stage_dir(cd16x_dir: Path, tmp_path: Path) -> Path:
    """A CD folder with stage 4 only (the published 4SE/4SD files)."""
    d = tmp_path / "cd4"
    d.mkdir()
    for f in ("4SE.pth", "4SD.pth"):
        shutil.copyfile(cd16x_dir / f, d / f)
    return d


@pytest.fixture
def one_stage_zoo(registry: TempRegistry, cd16x_dir: Path) -> str:  # noqa: F811
    """Zoo model `own`: cd-wct-16x's stage-4 files reused ("from"), stages [4], AdaIN defaults."""
    cd = real_entry(NAME)
    files = [{**f, "from": f"{NAME}/{f['name']}"} for f in cd["files"] if f["name"] in ("4SE.pth", "4SD.pth")]
    for f in files:
        del f["url"]
    registry.write({NAME: cd, "own": entry_json(files, stages=[4], defaults={"method": "adain", "levels": [4], "alpha": 1.0})})
    zoo.import_local(NAME, cd16x_dir)  # offline: the source model comes from the shared folder
    return "own"


# ---------------------------------------------------------------- resolution


def test_model_defaults_is_frozen_and_matches_the_cascade() -> None:
    d = model_defaults(NAME)
    assert d == ModelDefaults("wct", (5, 4, 3, 2, 1), 0.6)
    assert DEFAULT_ALPHA == cascade.DEFAULT_ALPHA and d.levels == cascade.DEFAULT_LEVELS
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.alpha = 1.0  # type: ignore[misc]
    assert d.restricted((4,)) == ModelDefaults("wct", (4,), 0.6)
    assert ModelDefaults("adain", (5, 4), 1.0).restricted((1, 2)) == ModelDefaults("adain", (2, 1), 1.0)


def test_zoo_entry_defaults(registry: TempRegistry) -> None:  # noqa: F811
    se = registry.package("own/4SE.pth", b"e")
    sd = registry.package("own/4SD.pth", b"d")
    registry.write({
        "own": entry_json([se, sd], stages=[4], defaults={"method": "adain", "levels": [4], "alpha": 1.0}),
        "partial": entry_json([se, sd], stages=[4], defaults={"alpha": 0.8}),
        "plain": entry_json([se, sd], stages=[4]),
    })  # fmt: skip
    assert model_defaults("own") == ModelDefaults("adain", (4,), 1.0)
    assert zoo.get_entry("own").defaults == ModelDefaults("adain", (4,), 1.0)
    assert model_defaults("partial") == ModelDefaults("wct", (4,), 0.8)  # missing keys: the base values
    assert model_defaults("plain") == ModelDefaults("wct", (4,), 0.6)
    with pytest.raises(zoo.UnknownModelError):
        model_defaults("nope")


def test_cd_folder_with_one_stage(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    for f in ("4SE.pth", "4SD.pth", "3SE.pth"):  # stage 3 lacks its decoder: not a stage of this folder
        (d / f).write_bytes(b"")
    assert model_defaults(d) == ModelDefaults("wct", (4,), 0.6)
    (d / "3SD.pth").write_bytes(b"")
    assert model_defaults(d) == ModelDefaults("wct", (4, 3), 0.6)
    # Recorded in architecture.json, which folder_arch still reads.
    path = write_folder_defaults(d, ModelDefaults("adain", (4,), 0.9))
    assert path == d / "architecture.json" and folder_arch(d) == ARCHS["cd16x"]
    assert model_defaults(d) == ModelDefaults("adain", (4,), 0.9)
    assert json.loads(path.read_text())["defaults"] == {"method": "adain", "levels": [4], "alpha": 0.9}
    with pytest.raises(CheckpointError, match="no model weights"):
        model_defaults(tmp_path)


def test_pytorch_adain_folder(adain_dir: Path) -> None:
    assert model_defaults(adain_dir) == ModelDefaults("adain", (4,), 1.0)


def test_bundle_records_and_yields_defaults(adain_dir: Path, one_thread: None) -> None:
    bundle = ensure_bundle(adain_dir)  # stages: the model's own, (4,)
    assert bundle.stages == (4,) and bundle.arch == ARCHS["vgg19"]
    assert bundle.manifest["defaults"] == {"method": "adain", "levels": [4], "alpha": 1.0}
    assert bundle.manifest["source_weights"].keys() == {"vgg_normalised.pth", "decoder.pth"}
    assert model_defaults(bundle.path) == ModelDefaults("adain", (4,), 1.0)
    assert ensure_bundle(adain_dir, stages=(4,)).path == bundle.path  # cached
    # A bundle without recorded defaults (older exports): derived from its stages.
    mf = bundle.path / "manifest.json"
    data = json.loads(mf.read_text())
    del data["defaults"]
    mf.write_text(json.dumps(data))
    assert model_defaults(bundle.path) == ModelDefaults("wct", (4,), 0.6)
    data["defaults"] = {"method": "adain", "levels": [5]}
    mf.write_text(json.dumps(data))
    with pytest.raises(ModelDefaultsError, match=rf"{mf}: defaults\.levels must be a non-empty list of the model's stages 4"):
        model_defaults(bundle.path)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad, message",
    [({"method": "gram"}, "defaults.method must be one of wct, adain, got 'gram'"),
     ({"levels": [5, 4]}, "defaults.levels must be a non-empty list of the model's stages 4"),
     ({"levels": []}, "defaults.levels must be a non-empty list"),
     ({"alpha": 1.5}, "defaults.alpha must be a number in 0..1, got 1.5"),
     ({"alpha": "0.5"}, "defaults.alpha must be a number in 0..1"),
     ({"strength": 1}, "unknown key(s) 'strength' in \"defaults\"")],
)  # fmt: skip
def test_invalid_defaults_name_the_file(registry: TempRegistry, tmp_path: Path, bad: dict, message: str) -> None:  # noqa: F811
    se, sd = registry.package("own/4SE.pth", b"e"), registry.package("own/4SD.pth", b"d")
    registry.write({"own": entry_json([se, sd], stages=[4], defaults=bad)})
    with pytest.raises(ModelDefaultsError) as ei:
        zoo.entries()
    assert isinstance(ei.value, zoo.ZooError) and isinstance(ei.value, ValueError)
    assert f"{registry.path} (model 'own')" in str(ei.value) and message in str(ei.value)
    # The same check for a folder's architecture.json.
    d = tmp_path / "m"
    d.mkdir()
    (d / "4SE.pth").write_bytes(b"")
    (d / "4SD.pth").write_bytes(b"")
    (d / "architecture.json").write_text(json.dumps({"defaults": bad}))
    with pytest.raises(ModelDefaultsError) as ei:
        model_defaults(d)
    assert str(d / "architecture.json") in str(ei.value) and message in str(ei.value)


# ---------------------------------------------------------------- models with fewer stages


def test_load_model_one_stage_zoo_entry(one_stage_zoo: str, one_thread: None) -> None:
    model = load_model(one_stage_zoo, stages=(4,))
    assert model.stages == (4,) and model.arch == ARCHS["cd16x"]
    assert model.defaults == ModelDefaults("adain", (4,), 1.0)
    assert load_model(one_stage_zoo).stages == (4,)  # default: every stage the model has
    with pytest.raises(CheckpointError) as ei:
        load_model(one_stage_zoo, stages=(5, 4, 3, 2, 1))
    assert str(ei.value) == "model own has stages 4; asked for 5,4,3,2,1; choose levels among 4"

    name, files = weights_digest(one_stage_zoo)
    assert name == "own" and files == {f.name: f.sha256 for f in zoo.get_entry("own").files}
    with pytest.raises(CheckpointError, match="choose levels among 4"):
        ensure_bundle(one_stage_zoo, stages=(5, 4))
    bundle = ensure_bundle(one_stage_zoo, stages=(4,))
    assert bundle.stages == (4,) and set(bundle.manifest["networks"]) == {
        "encoder4", "decoder4", "decoder_affine4", "decoder_folded4"}  # fmt: skip
    assert read_bundle(bundle.path).manifest["defaults"]["method"] == "adain"
    runner = open_runner(one_stage_zoo, backend="torch")
    assert runner.stages == (4,)


def test_load_model_cd_folder_missing_stage(one_stage_dir: Path) -> None:
    assert load_model(one_stage_dir, stages=(4,)).stages == (4,)
    with pytest.raises(CheckpointError) as ei:
        load_model(one_stage_dir, stages=(5, 4))
    msg = str(ei.value)
    assert msg.startswith(f"model {one_stage_dir} has stages 4; asked for 5,4 (missing: 5SE.pth, 5SD.pth)")
    assert msg.endswith("choose levels among 4")
    with pytest.raises(CheckpointError, match="choose levels among 4"):
        weights_digest(one_stage_dir, (5, 4))


def test_load_model_pytorch_adain_folder(adain_dir: Path) -> None:
    model = load_model(adain_dir, stages=(4,))
    assert model.arch == ARCHS["vgg19"] and model.stages == (4,)
    assert model.defaults == ModelDefaults("adain", (4,), 1.0)
    vgg = torch.load(adain_dir / "vgg_normalised.pth", weights_only=True)
    assert torch.equal(model.encoders[4].conv41.weight, vgg["29.weight"])
    x = torch.rand(1, 3, 16, 16)
    assert model.decode(4, model.encode(4, x), torch.eye(512), torch.zeros(512)).shape == (1, 3, 16, 16)
    with pytest.raises(CheckpointError, match=r"pytorch-AdaIN weights\) has stages 4; asked for 5,4; choose levels among 4"):
        load_model(adain_dir, stages=(5, 4))


def test_non_stylization_zoo_format_is_refused_before_download() -> None:
    with pytest.raises(CheckpointError, match="format 'cd-base', which is not a stylization model"):
        load_model("cd-16x-pruned-base")
    assert not zoo.model_dir("cd-16x-pruned-base").exists()
