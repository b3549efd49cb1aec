"""`build --check`: the static TensorRT compatibility check, on the real CD 16x bundle and on graphs it must reject."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.export.bundle import export_bundle, read_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.models.zoo import sha256_file
from ultrastyle.trt.check import check_bundle, check_model


@pytest.fixture(scope="module")
def bundle(cd16x_dir, tmp_path_factory):
    return export_bundle(load_cd_folder(cd16x_dir), tmp_path_factory.mktemp("trtcheck") / "cd16x")


def _errors(model: onnx.ModelProto, kind: str | None = "encoder") -> list[str]:
    return [f.message for f in check_model(model, "g.onnx", kind=kind) if f.severity == "error"]


def _load(bundle, name: str) -> onnx.ModelProto:
    return onnx.load(bundle.graph_path(name))


def test_real_cd16x_bundle_is_compatible_at_fp32_and_fp16(bundle):
    for precision in ("fp32", "fp16"):
        report = check_bundle(bundle, precisions=(precision,))
        assert report.ok, [str(f) for f in report.errors]
        # 5 stages x (encoder, decoder, decoder_affine, stats); stages 4 and 5 share the 128-channel statistics graph
        assert report.graphs == 19 and report.nodes > 300


def test_cli_check_exits_0_and_says_compatible(bundle):
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--check"])
    assert r.exit_code == 0, r.output
    assert "compatible with TensorRT at fp32" in r.output and "stage 5: 32.." in r.output


def test_edge_pad_is_rejected_for_a_stage_graph(bundle):
    m = _load(bundle, "encoder2")
    pad = next(n for n in m.graph.node if n.op_type == "Pad")
    pad.attribute[0].s = b"edge"
    errs = _errors(m)
    assert len(errs) == 1 and "Pad mode 'edge'" in errs[0] and "reflection" in errs[0]


def test_resize_cubic_is_rejected(bundle):
    m = _load(bundle, "decoder3")
    rs = next(n for n in m.graph.node if n.op_type == "Resize")
    next(a for a in rs.attribute if a.name == "mode").s = b"cubic"
    assert any("Resize mode 'cubic'" in e and "nearest and linear" in e for e in _errors(m, "decoder"))
    assert any("Resize mode 'cubic'" in e for e in _errors(m, None))  # a TensorRT rule, not only ultrastyle's


def test_maxpool_with_indices_is_rejected(bundle):
    m = _load(bundle, "encoder3")
    mp = next(n for n in m.graph.node if n.op_type == "MaxPool")
    mp.output.append("pool_indices")
    assert any("Indices" in e for e in _errors(m, None))


def test_runtime_pads_unsupported_op_and_opset_are_rejected(bundle):
    m = _load(bundle, "encoder1")
    pad = next(n for n in m.graph.node if n.op_type == "Pad")
    m.graph.node.insert(0, helper.make_node("Identity", [pad.input[1]], ["pads_runtime"]))
    pad.input[1] = "pads_runtime"
    assert any("computed at run time" in e for e in _errors(m))
    m2 = _load(bundle, "encoder1")
    m2.graph.node.append(helper.make_node("StringNormalizer", ["features"], ["s"]))
    assert any("StringNormalizer is not supported" in e for e in _errors(m2))
    m3 = _load(bundle, "encoder1")
    m3.opset_import[0].version = 25
    assert any("opset 25" in e for e in _errors(m3))
    m4 = _load(bundle, "encoder1")
    m4.opset_import[0].version = 21
    assert not _errors(m4) and any(f.severity == "warning" for f in check_model(m4, "g", kind="encoder"))


def _qdq_conv(zero_point: int = 0, zp_type=TensorProto.INT8, q_to_conv: bool = False, scale: float = 0.02) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 weights)) -> y: the explicit-quantization pattern TensorRT fuses."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "sx"),
        helper.make_tensor("zx", zp_type, [], [zero_point]),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(4, np.int8), "zw"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"], name="dqw", axis=0),
        helper.make_node("Conv", ["xq" if q_to_conv else "xd", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "H", "W"])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_rules():
    assert _errors(_qdq_conv(), None) == []
    assert any("zero-point is [3]" in e for e in _errors(_qdq_conv(zero_point=3), None))
    assert any("signed" in e for e in _errors(_qdq_conv(zp_type=TensorProto.UINT8), None))
    assert any("straight into a DequantizeLinear" in e for e in _errors(_qdq_conv(q_to_conv=True), None))
    assert any("positive scales" in e for e in _errors(_qdq_conv(scale=0.0), None))


def test_int8_without_qdq_graphs_says_to_calibrate(bundle):
    from ultrastyle.cli.remedies import swap

    report = check_bundle(bundle, precisions=("int8",))
    assert not report.ok and "ultrastyle.calibrate(" in report.errors[0].message
    assert f"ultrastyle calibrate {bundle.path} --images YOUR_PHOTOS/ --activations int8" in swap(str(report.errors[0]), report.errors[0].remedy)


def test_int8_qdq_graph_stored_by_calibration_is_checked(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst, ignore=shutil.ignore_patterns("engines"))
    onnx.save(_qdq_conv(zero_point=5), dst / "encoder1.int8.onnx")
    mf = json.loads((dst / "manifest.json").read_text())
    mf["networks"]["encoder1"]["int8"] = {"file": "encoder1.int8.onnx", "sha256": sha256_file(dst / "encoder1.int8.onnx")}
    (dst / "manifest.json").write_text(json.dumps(mf))
    report = check_bundle(read_bundle(dst), precisions=("int8",), stages=(1,))
    # the Q and the DQ of the activation pair each carry the zero-point
    assert {("encoder1.int8.onnx" in f.where, "zero-point is [5]" in f.message) for f in report.errors} == {(True, True)}


def test_cli_check_lists_problems_and_exits_1(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst, ignore=shutil.ignore_patterns("engines"))
    m = onnx.load(dst / "decoder2.onnx")
    next(a for a in next(n for n in m.graph.node if n.op_type == "Resize").attribute if a.name == "mode").s = b"cubic"
    onnx.save(m, dst / "decoder2.onnx")
    mf = json.loads((dst / "manifest.json").read_text())
    mf["networks"]["decoder2"]["sha256"] = sha256_file(dst / "decoder2.onnx")
    (dst / "manifest.json").write_text(json.dumps(mf))
    r = CliRunner().invoke(app, ["build", str(dst), "--check", "--stages", "1,2"])
    assert r.exit_code == 1, r.output
    assert "decoder2.onnx: node" in r.output and "cubic" in r.output and "NOT compatible" in r.output


def test_cli_check_rejects_a_profile_too_small_for_the_halo(bundle):
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--check", "--tile-max", "64"])
    assert r.exit_code == 1
    assert "stage 5 profile" in r.output and "(--tile-max)" in r.output


def test_cli_check_refuses_tile_sides_out_of_order_and_absent_stages_naming_the_flags(bundle, cd16x_dir, tmp_path):
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--check", "--tile-min", "900", "--tile-max", "512"])
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "--tile-min 900 is above --tile-max 512" in text and "tile_min" not in text, text
    one = export_bundle(load_cd_folder(cd16x_dir, stages=(1,)), tmp_path / "one", spec=ExportSpec(stages=(1,)), validate=False)
    r = CliRunner().invoke(app, ["build", str(one.path), "--check", "--stages", "3"])
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "has no stage(s) [3]" in text and "choose among them (--stages)" in text, text


def test_cli_check_warns_that_a_raised_tile_min_leaves_small_images_out(bundle):
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--check", "--tile-min", "512"])
    assert r.exit_code == 0, r.output  # a warning: the engines work, for images large enough
    assert "warning: stage 5 profile: profile min 512 px" in " ".join(r.output.split()) and "cannot run on these engines" in r.output
    default = CliRunner().invoke(app, ["build", str(bundle.path), "--check"])
    assert "cannot run on these engines" not in default.output  # the default minimum is 2 x grid


def test_cast_to_int8_is_rejected(bundle):
    # operators.md: Cast takes FP32, FP16, BF16, INT32, INT64, UINT8, BOOL; int8 tensors come from Q/DQ only
    m = _load(bundle, "encoder1")
    out = m.graph.output[0].name
    producer = next(n for n in m.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "pre"
    m.graph.node.extend([helper.make_node("Cast", ["pre"], ["q"], to=TensorProto.INT8, name="to_int8"),
                         helper.make_node("Cast", ["q"], [out], to=TensorProto.FLOAT, name="back")])  # fmt: skip
    errs = _errors(m, None)
    assert len(errs) == 1 and "Cast to INT8" in errs[0]


def _qdq_without_zero_point(output_dtype: int | None = None) -> onnx.ModelProto:
    m = _qdq_conv()
    for n in m.graph.node:
        if n.name in ("q", "dq"):
            del n.input[2:]
    q = next(n for n in m.graph.node if n.name == "q")
    if output_dtype is not None:
        q.attribute.append(helper.make_attribute("output_dtype", output_dtype))
        m.opset_import[0].version = 21
    return m


def test_quantize_without_a_zero_point_is_rejected():
    # ONNX's QuantizeLinear without a zero-point outputs UINT8 (offset 128 in effect); TensorRT computes signed INT8
    errs = _errors(_qdq_without_zero_point(), None)
    assert len(errs) == 1 and "without a zero-point" in errs[0] and "UINT8" in errs[0]
    assert _errors(_qdq_without_zero_point(TensorProto.INT8), None) == []  # opset 21's output_dtype says int8
    assert len(_errors(_qdq_without_zero_point(TensorProto.UINT8), None)) == 1


def _one_node(op: str, inputs: list[str], attrs: dict, *, consts: dict[str, np.ndarray] = {}, opset: int = 18) -> onnx.ModelProto:  # noqa: B006
    """x (1, 4, 8, 8) float -> ``op`` -> y, plus a runtime tensor ``dyn`` (int64, computed from x's shape) for inputs that should be constant."""
    shape = helper.make_node("Shape", ["x"], ["dyn_full"], name="shape")
    dyn = helper.make_node("Slice", ["dyn_full", "s0", "s1"], ["dyn"], name="slice")
    node = helper.make_node(op, inputs, ["y"], name="n", **attrs)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1")]
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph([shape, dyn, node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


W4 = np.zeros((4, 4, 3, 3), np.float32)


@pytest.mark.parametrize("op, inputs, attrs, consts, expected", [
    ("MaxPool", ["x"], {"kernel_shape": [2, 2], "dilations": [2, 2]}, {}, "MaxPool dilations [2, 2]"),
    ("MaxPool", ["x"], {"kernel_shape": [2]}, {}, "TensorRT pools in 2D or 3D only"),
    ("Pad", ["x", "dyn"], {"mode": "reflect"}, {}, "Pad's pads are computed at run time"),
    ("Resize", ["x", "", "", "dyn"], {"mode": "nearest"}, {}, "Resize scales/sizes are computed at run time"),
    ("Resize", ["x", "", "sc"], {"mode": "linear", "antialias": 1}, {"sc": np.array([1, 1, 2, 2], np.float32)}, "Resize with antialias"),
    ("ReduceMean", ["x", "dyn"], {}, {}, "ReduceMean axes must be an initializer"),
    ("Squeeze", ["x", "dyn"], {}, {}, "Squeeze axes must be resolvable to a constant"),
    ("Conv", ["x", "w"], {"kernel_shape": [3, 3, 3, 3]}, {"w": W4}, "TensorRT convolves in 1D, 2D or 3D only"),
])  # fmt: skip
def test_each_node_check_rejects_what_tensorrt_cannot_run(op, inputs, attrs, consts, expected):
    errs = _errors(_one_node(op, inputs, attrs, consts=consts), None)
    assert any(expected in e for e in errs), errs


def test_the_stage_contract_refuses_runtime_conv_weights():
    m = _one_node("Conv", ["x", "wdyn"], {"kernel_shape": [3, 3]}, consts={})
    m.graph.node.insert(2, helper.make_node("Identity", ["w"], ["wdyn"], name="wcopy"))  # weights through a node
    m.graph.initializer.append(numpy_helper.from_array(W4, "w"))
    assert not any("computed at run time" in e for e in _errors(m, None))  # only stage graphs promise constant weights
    assert any("convolution weights are computed at run time" in e for e in _errors(m, "encoder"))


def test_cli_check_refuses_the_flags_of_a_build_it_does_not_run(bundle, tmp_path):
    for flags in (["--force"], ["--verbose"], ["--timing-cache", str(tmp_path / "t.cache")]):
        r = CliRunner().invoke(app, ["build", str(bundle.path), "--check", *flags])
        text = " ".join(r.output.replace("│", " ").split())
        assert r.exit_code == 2 and f"{flags[0]} applies to a build, and --check builds nothing" in text, text


def test_a_build_names_the_bundle_s_own_problem_before_the_missing_tensorrt(bundle):
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--precision", "int8"])
    text = " ".join(r.output.split())
    # exit 2, as stylize --precision int8 refuses the bundle (it was 1)
    assert r.exit_code == 2 and "has no int8 (Q/DQ) graphs" in text and "needs the tensorrt package" not in text, text


def test_cli_check_says_where_a_stage_grid_moved_a_tile_side_given(bundle):
    # A user review: --tile-min 40 --tile-max 40 became 48..48..48 at stage 5 without a word (and 8 became 32 at every stage).
    r = CliRunner().invoke(app, ["build", str(bundle.path), "--check", "--tile-min", "40", "--tile-max", "40", "--stages", "5"])
    text = " ".join(r.output.split())
    assert "warning: --tile-min 40 is 48 px at stage 5" in text and "warning: --tile-max 40 is 48 px at stage 5" in text, text
    quiet = CliRunner().invoke(app, ["build", str(bundle.path), "--check", "--tile-min", "64", "--stages", "5"])
    assert "--tile-min 64 is" not in quiet.output  # 64 is on stage 5's grid
