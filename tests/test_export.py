"""ONNX export: bundle contents, validation against PyTorch, manifest integrity."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.cli.remedies import as_command
from ultrastyle.core.arch import ARCHS
from ultrastyle.core.receptive import stage_radius
from ultrastyle.export import graph as graph_mod
from ultrastyle.export.bundle import BundleError, arch_from_dict, arch_to_dict, export_bundle, read_bundle
from ultrastyle.export.spec import ATOL, BUNDLE_FORMAT_VERSION, ExportSpec
from ultrastyle.export.validate import ExportValidationError
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.models.zoo import sha256_file


@pytest.fixture(scope="module")
def model(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return export_bundle(model, tmp_path_factory.mktemp("export") / "cd16x", source_weights={"1SE.pth": "ab" * 32})


def test_bundle_has_every_stage_network_validated_within_tolerance(bundle):
    nets = bundle.manifest["networks"]
    kinds = ("encoder", "decoder", "decoder_affine", "decoder_folded")
    assert sorted(nets) == sorted(f"{kind}{k}" for kind in kinds for k in range(1, 6))
    for name, report in bundle.manifest["validation"].items():
        kind = nets[name]["kind"]
        assert report["max_abs_diff"] <= ATOL["float32"][kind] * 10  # atol + rtol*|ref| bound, features reach ~1e2
        assert len(report["sizes"]) >= 3
    assert all((bundle.path / n["file"]).is_file() for n in nets.values())


def test_manifest_records_architecture_receptive_fields_and_io(bundle):
    m = bundle.manifest
    assert m["format_version"] == BUNDLE_FORMAT_VERSION and m["opset"] == 17
    assert arch_from_dict(m["architecture"]) == ARCHS["cd16x"] == bundle.arch
    assert m["receptive_fields"]["5"]["stage_px"] == stage_radius(ARCHS["cd16x"], 5)
    enc3 = m["networks"]["encoder3"]
    assert enc3["inputs"] == [{"name": "image", "shape": ["N", 3, "H", "W"], "dtype": "float32"}]
    assert enc3["outputs"][0]["shape"] == ["N", 64, "h", "w"] and enc3["grid"] == 4
    assert m["source_weights"] == {"1SE.pth": "ab" * 32}


def test_manifest_round_trips(bundle):
    again = read_bundle(bundle.path)
    assert again.manifest == json.loads((bundle.path / "manifest.json").read_text()) == bundle.manifest
    assert arch_from_dict(arch_to_dict(ARCHS["vgg19"])) == ARCHS["vgg19"]


def test_graphs_have_dynamic_axes_and_constant_reflect_pads(bundle):
    g = onnx.load(bundle.graph_path("encoder5")).graph
    dims = [d.dim_param or d.dim_value for d in g.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    inits = {i.name for i in g.initializer}
    pads = [n for n in g.node if n.op_type == "Pad"]
    assert len(pads) == 13  # every 3x3 conv of encoder 5: 2 + 2 + 4 + 4 + 1
    assert all(n.input[1] in inits and onnx.helper.get_attribute_value(n.attribute[0]) == b"reflect" for n in pads)
    ops = {n.op_type for n in onnx.load(bundle.graph_path("decoder_affine5")).graph.node}
    assert {"MatMul", "Resize", "Conv", "Relu", "Pad"} <= ops and "MaxPool" not in ops


def test_folded_decoder_equals_the_unfused_affine_decoder(bundle):
    # The map folded into the first conv (no full-size MatMul) is the same function as A f + b then decode.
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    for k in (1, 3, 5):
        c = bundle.arch.feature_channels(k)
        feed = {
            "features": (rng.standard_exponential((1, c, 9, 13)) * 2).astype(np.float32),
            "A": (np.eye(c) * 0.6 + rng.standard_normal((c, c)) * 0.4 / np.sqrt(c)).astype(np.float32),
            "b": (rng.standard_normal(c) * 0.3).astype(np.float32),
        }
        out = {}
        for kind in ("decoder_affine", "decoder_folded"):
            sess = ort.InferenceSession(str(bundle.graph_path(f"{kind}{k}")), providers=["CPUExecutionProvider"])
            out[kind] = sess.run(None, feed)[0]
        diff = np.abs(out["decoder_affine"] - out["decoder_folded"]).max()
        assert diff <= ATOL["float32"]["decoder_folded"], (k, diff)
        ops = [n.op_type for n in onnx.load(bundle.graph_path(f"decoder_folded{k}")).graph.node]
        assert ops.index("Pad") < ops.index("Conv") and ops.count("MatMul") == 2  # weights and bias folding only


def _copy(bundle, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    return dst


def test_tampered_graph_is_detected_by_sha256(bundle, tmp_path):
    dst = _copy(bundle, tmp_path)
    data = bytearray((dst / "decoder3.onnx").read_bytes())
    data[-10] ^= 0xFF
    (dst / "decoder3.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"decoder3.onnx: sha256 .* does not match .* export the bundle again") as info:
        read_bundle(dst)
    # The fix is the command that makes the bundle again, over it: from its zoo model (this fixture's folder has a zoo name),
    assert as_command(info.value).endswith(f"ultrastyle export cd-wct-16x --output {dst} --stages 1,2,3,4,5")  # the same bundle
    m = json.loads((dst / "manifest.json").read_text())
    m["model"] = "my-weights"  # or MODEL for a weights folder, which the manifest knows by its name only
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as info:
        read_bundle(dst)
    assert as_command(info.value).endswith(f"ultrastyle export MODEL --output {dst} --stages 1,2,3,4,5")
    (dst / "decoder3.int8.onnx").write_bytes(b"calibrated")  # the export it advised was refused: it would delete this
    with pytest.raises(BundleError) as info:
        read_bundle(dst)
    assert as_command(info.value).endswith(f"export the bundle again, which deletes its 1 int8 graph (made again after it): ultrastyle "
                                           f"export MODEL --output {dst} --stages 1,2,3,4,5 --force")  # fmt: skip


def test_newer_bundle_format_is_refused_with_a_clear_message(bundle, tmp_path):
    dst = _copy(bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"version 2 is newer .* upgrade ultrastyle"):
        read_bundle(dst)


def test_missing_graph_and_non_bundle_folders_are_named(bundle, tmp_path):
    dst = _copy(bundle, tmp_path)
    (dst / "encoder1.onnx").unlink()
    with pytest.raises(BundleError, match="encoder1.onnx: graph encoder1 listed in the manifest is missing"):
        read_bundle(dst)
    with pytest.raises(BundleError, match=r"not a bundle .* ultrastyle\.export_model\(MODEL, ") as info:
        read_bundle(tmp_path)
    assert as_command(info.value).endswith("create one with ultrastyle export MODEL --output NEW_FOLDER")  # export refuses tmp_path


def test_mismatching_graph_raises_typed_error_with_max_difference_and_leaves_nothing(model, tmp_path, monkeypatch):
    real = graph_mod.build_graph

    def broken(net, spec, **kw):
        g = real(net, spec, **kw)
        if spec.name == "decoder2":
            w = next(i for i in g.graph.initializer if i.name == "conv11.bias")
            arr = onnx.numpy_helper.to_array(w) + 0.01
            w.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), "conv11.bias"))
        return g

    monkeypatch.setattr(graph_mod, "build_graph", broken)
    with pytest.raises(ExportValidationError) as err:
        export_bundle(model, tmp_path / "b", spec=ExportSpec(stages=(1, 2)))
    assert err.value.network == "decoder2" and err.value.max_diff == pytest.approx(0.01, rel=0.05)
    assert "differs from PyTorch by up to" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_opset_is_refused(model, tmp_path):
    with pytest.raises(BundleError, match="opset 9 is not supported"):
        export_bundle(model, tmp_path / "b", spec=ExportSpec(opset=9))


def test_export_cli_writes_a_bundle_that_stylize_accepts(cd16x_dir, tmp_path, shared_dir):
    r = CliRunner().invoke(app, ["export", str(cd16x_dir), "-o", str(tmp_path / "b"), "--stages", "1,2"])
    assert r.exit_code == 0, r.output
    assert "wrote 8 graphs" in r.output
    b = read_bundle(tmp_path / "b")
    assert b.stages == (1, 2) and b.manifest["source_weights"]["2SD.pth"]
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 100, 50)).save(tmp_path / "c.png")
    r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), str(shared_dir / "images/style/cd_style_in2.jpg"),
                                 "--model", str(tmp_path / "b"), "--levels", "2,1", "--style-size", "64",
                                 "-o", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out/c_stylized_cd_style_in2.png").is_file()


def test_aux_embeddings_are_exported_only_when_asked(cd16x_dir, bundle, tmp_path):
    assert not any(n.startswith("encoder_aux") for n in bundle.manifest["networks"])
    aux_model = load_cd_folder(cd16x_dir, stages=(2,), aux=True)
    b = export_bundle(aux_model, tmp_path / "aux", spec=ExportSpec(stages=(2,), kinds=("encoder", "encoder_aux")))
    outs = b.manifest["networks"]["encoder_aux2"]["outputs"]
    assert [o["name"] for o in outs] == ["features", "embed1", "embed2"]
    assert [o["shape"][1] for o in outs] == [32, 64, 128]  # student width, then the teacher widths of Q_1, Q_2
    assert b.manifest["validation"]["encoder_aux2"]["max_abs_diff"] < 1e-3
    with pytest.raises(BundleError, match="without its aux layers"):
        export_bundle(load_cd_folder(cd16x_dir, stages=(2,)), tmp_path / "x", spec=ExportSpec(stages=(2,), kinds=("encoder_aux",)))


def test_export_refuses_to_replace_a_folder_that_is_not_a_bundle(model, bundle, tmp_path):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        export_bundle(model, tmp_path / "project", spec=ExportSpec(stages=(1,)))
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"
    r = CliRunner().invoke(app, ["export", "no-such-model", "-o", str(tmp_path / "project")])
    assert r.exit_code == 2 and "exists and is not a bundle" in " ".join(r.output.split())  # refused before the model is looked up
    (tmp_path / "project" / "manifest.json").write_text('{"name": "a web extension"}')  # another program's manifest
    with pytest.raises(BundleError, match=r"is not a bundle \(its manifest.json is not an ultrastyle bundle's\)"):
        export_bundle(model, tmp_path / "project", spec=ExportSpec(stages=(1,)))
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["manifest.json", "notes.txt"]
    # an existing bundle is replaced whole
    dst = _copy(bundle, tmp_path)
    again = export_bundle(model, dst, spec=ExportSpec(stages=(1,)))
    assert sorted(again.manifest["networks"]) == ["decoder1", "decoder_affine1", "decoder_folded1", "encoder1"]
    assert sorted(p.name for p in dst.iterdir()) == [
        "decoder1.onnx", "decoder_affine1.onnx", "decoder_folded1.onnx", "encoder1.onnx", "manifest.json"
    ]  # fmt: skip
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_manifest_naming_a_file_outside_the_bundle_is_refused(bundle, tmp_path):
    dst = _copy(bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["networks"]["encoder1"]["file"] = "../encoder1.onnx"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        read_bundle(dst)


def test_a_graph_that_is_not_onnx_is_named_by_every_user_of_the_bundle(bundle, tmp_path):
    """A graph whose bytes match the manifest but do not parse: one typed error naming the file, no protobuf traceback."""
    from ultrastyle.export.bundle import load_graph
    from ultrastyle.runtime.backends.base import RunnerError
    from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
    from ultrastyle.trt.check import check_bundle

    dst = _copy(bundle, tmp_path)
    (dst / "encoder1.onnx").write_text("not a graph")
    m = json.loads((dst / "manifest.json").read_text())
    m["networks"]["encoder1"]["sha256"] = sha256_file(dst / "encoder1.onnx")
    (dst / "manifest.json").write_text(json.dumps(m))
    b = read_bundle(dst)  # the digest matches: only parsing finds it
    with pytest.raises(BundleError, match=r"encoder1.onnx: not an ONNX graph"):
        load_graph(dst / "encoder1.onnx")
    with OnnxRuntimeRunner(b, stages=(1,)) as runner, pytest.raises(RunnerError, match=r"encoder1.onnx: ONNX Runtime cannot load"):
        runner.session("encoder1")
    report = check_bundle(b, stages=(1,))
    assert not report.ok and any("encoder1" in str(f) and "not an ONNX graph" in str(f) for f in report.errors), report.findings


def test_export_names_a_parent_that_is_a_file(model, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BundleError, match=r"afile is a file, not a folder"):
        export_bundle(model, tmp_path / "afile" / "sub", spec=ExportSpec(stages=(1,)))
    r = CliRunner().invoke(app, ["export", "no-such-model", "-o", str(tmp_path / "afile" / "sub")])
    assert r.exit_code == 2 and "is a file, not a folder" in " ".join(r.output.split())  # before the model is looked up


def test_a_bundle_that_lost_its_manifest_is_not_called_a_weights_folder(bundle, tmp_path):
    from ultrastyle.models.convert import CheckpointError
    from ultrastyle.models.sources import model_stages

    dst = _copy(bundle, tmp_path)
    (dst / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"ONNX graphs but no manifest.json"):
        model_stages(dst)


def test_exporting_a_bundle_says_it_is_a_bundle_not_that_its_manifest_is_missing(bundle, tmp_path):
    from ultrastyle.deploy import export_model
    from ultrastyle.models.convert import CheckpointError

    with pytest.raises(CheckpointError, match=r"an ONNX bundle.*, not model weights; give the zoo model or weights folder"):
        export_model(bundle.path, tmp_path / "again")
    r = CliRunner().invoke(app, ["export", str(bundle.path), "-o", str(tmp_path / "again")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "an ONNX bundle" in text and "no manifest.json" not in text, text
    assert not (tmp_path / "again").exists()


def test_opening_something_that_is_not_a_bundle_says_what_it_is_and_a_fix_that_works(tmp_path):
    from ultrastyle.export.bundle import read_bundle

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "afile").write_text("x")
    cases = {"photos": "not a bundle (no manifest.json); create one with ultrastyle.export_model(MODEL, NEW_FOLDER)",
             "nowhere": "no such folder; create one with ultrastyle.export_model(MODEL, ",
             "afile": "a file, not a bundle folder"}  # fmt: skip
    for name, said in cases.items():
        with pytest.raises(BundleError) as info:
            read_bundle(tmp_path / name)
        assert said in str(info.value), str(info.value)
    r = CliRunner().invoke(app, ["build", str(tmp_path / "photos")])
    assert r.exit_code == 2 and "ultrastyle export MODEL --output NEW_FOLDER" in " ".join(r.output.split()), r.output
    with pytest.raises(BundleError, match="an empty bundle path"):  # not "./: not a bundle"
        read_bundle("")
    for argv in (["build", ""], ["calibrate", "", "--images", str(tmp_path / "photos")]):
        r = CliRunner().invoke(app, argv)
        assert r.exit_code == 2 and "an empty" in r.output and "no model weights" not in r.output, (argv, r.output)


def test_a_bundle_with_an_unreadable_manifest_says_to_export_again_and_export_may_replace_it(model, bundle, tmp_path):
    dst = _copy(bundle, tmp_path)
    (dst / "manifest.json").write_text("{ cut off")
    with pytest.raises(BundleError, match="unreadable manifest") as info:
        read_bundle(dst)
    assert as_command(info.value).endswith(f"export the bundle again: ultrastyle export MODEL --output {dst}")
    again = export_bundle(model, dst, spec=ExportSpec(stages=(1,)))  # the fix works: a damaged bundle is replaced
    assert again.stages == (1,)
    (dst / "notes.txt").write_text("mine")
    (dst / "manifest.json").write_text("{ cut off")  # beside a file of the user's: not a damaged bundle alone, kept
    with pytest.raises(BundleError, match="exists and is not a bundle"):
        export_bundle(model, dst, spec=ExportSpec(stages=(1,)))
    assert (dst / "notes.txt").read_text() == "mine"


def test_export_cli_refuses_stages_the_model_lacks_as_a_usage_error(cd16x_dir, tmp_path):
    # A one-stage model (as ultrastyle-adain-16x is): it was an OptionError traceback with exit 1.
    model = tmp_path / "one-stage"
    model.mkdir()
    for name in ("1SE.pth", "1SD.pth"):
        (model / name).symlink_to(cd16x_dir / name)
    r = CliRunner().invoke(app, ["export", str(model), "-o", str(tmp_path / "b"), "--stages", "2"])
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "has no stage(s) [2]; it has [1]" in said and "Traceback" not in said, said
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit, said", [
    ("del m['networks']", "expected 'networks' to map graph names to their files, found NoneType"),
    ("m['networks'] = []", "found list"),
    ("del m['networks']['encoder1']['sha256']", "the graph of encoder1 lacks its file or sha256"),
    ("del m['architecture']", "its 'architecture' record cannot be read"),
    ("m['format_version'] = '1'", "format_version '1' is none this ultrastyle knows"),
    ("del m['format_version']", "format_version None is none this ultrastyle knows"),
    ("m['format_version'] = 0", "format_version 0 is none"),
    ("m['networks']['encoder1']['int8'] = {'file': '../x.onnx', 'sha256': 'ab'}", "int8 graph encoder1 names a file outside the bundle"),
    ("m['architecture'] = {}", "its 'architecture' record cannot be read"),
    ("m['stages'] = [1, 2, 3, 4, 5, 6][:5]; [m['networks'].pop(n) for n in list(m['networks']) if n.endswith('5')]",
     "'stages' lists [5], which no graph is of"),
    ("m['calibration'] = [1]", "its 'calibration' record is not a record"),
])  # fmt: skip
def test_an_edited_manifest_is_a_bundle_error_not_a_traceback(bundle, tmp_path, edit, said):
    # A user review: KeyErrors and AttributeErrors from stylize, calibrate and build --check; "version None is newer".
    dst = _copy(bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    exec(edit, {"m": m})  # each edit changes m in place
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=re.escape(said)):
        read_bundle(dst)


def test_export_over_a_calibrated_or_built_bundle_needs_force(bundle, tmp_path):
    from ultrastyle.cli.remedies import as_command
    from ultrastyle.export.bundle import BundleTargetError, check_bundle_target

    dst = _copy(bundle, tmp_path)
    (dst / "encoder1.int8.onnx").write_bytes((dst / "encoder1.onnx").read_bytes())
    (dst / "decoder_affine1.int8.onnx").write_bytes((dst / "decoder_affine1.onnx").read_bytes())
    with pytest.raises(BundleTargetError, match=r"holding 2 int8 graphs, which exporting over it would delete") as info:
        check_bundle_target(dst)  # a re-export deleted the calibration without a word
    assert "(force=True)" in str(info.value) and "(--force)" in as_command(info.value)
    (dst / "engines").mkdir()
    (dst / "engines" / "x.plan").write_bytes(b"\0")
    with pytest.raises(BundleTargetError, match=r"holding 2 int8 graphs and TensorRT engines"):
        check_bundle_target(dst)
    check_bundle_target(dst, force=True)
    for p in dst.glob("*.int8.onnx"):
        p.unlink()
    (dst / "engines" / "x.plan").unlink()
    check_bundle_target(dst)  # an empty engines folder is nothing to lose


def test_export_over_a_bundle_keeps_files_that_are_not_the_bundles_and_a_read_only_one_leaves_nothing(bundle, tmp_path):
    from ultrastyle.export.bundle import BundleTargetError, check_bundle_target

    dst = _copy(bundle, tmp_path)
    (dst / "NOTES.txt").write_text("mine")
    (dst / "samples").mkdir()
    with pytest.raises(BundleTargetError, match=r"also holds files that are not the bundle's \(NOTES.txt, samples/\)"):
        check_bundle_target(dst)  # exporting over it deleted them
    (dst / "NOTES.txt").unlink()
    (dst / "samples").rmdir()
    (dst / ".DS_Store").write_bytes(b"\0")  # a file browser's: replaced with the bundle, not a reason to refuse
    check_bundle_target(dst)
    from ultrastyle.io.atomic import atomic_dir

    # A shipped, read-only bundle replaced by a new export: the old copy is removed too (as root, which CI may be, the modes
    # stop nothing; as a user the old copy was left beside it as a hidden partial folder).
    for p in [*dst.iterdir(), dst]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    with atomic_dir(dst) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no hidden partial copy left beside it


def test_a_full_disk_during_an_export_names_the_bundle(model, tmp_path, monkeypatch):
    import errno

    import ultrastyle.export.bundle as bundle_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as onnx.save says it: no file name

    monkeypatch.setattr(bundle_module, "_export", full)
    with pytest.raises(BundleError, match=rf"{tmp_path / 'b'}: cannot write the bundle \(No space left on device\)"):
        export_bundle(model, tmp_path / "b", spec=ExportSpec(stages=(1,)))


def test_the_bundle_lock_follows_a_folder_swapped_in_while_it_was_taken(tmp_path, monkeypatch):
    """An export swaps the bundle folder: a lock taken on the folder opened before the swap guarded a deleted folder."""
    fcntl = pytest.importorskip("fcntl", reason="the lock is fcntl's flock, which Windows lacks")
    import ultrastyle.export.bundle as bundle_module

    path = tmp_path / "b"
    path.mkdir()
    real, calls = fcntl.flock, []

    def swap_then_lock(fd: int, op: int) -> None:
        if not calls:  # as an export's rename lands between this process's open and its lock
            path.rename(tmp_path / "old")
            path.mkdir()
        calls.append(os.fstat(fd).st_ino)
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", swap_then_lock)
    with bundle_module.bundle_in_use(path):
        assert calls[-1] == path.stat().st_ino != calls[0]  # locked again, on the folder now there
