"""What a review against TensorRT's real API found (issue 25), through a stand-in that refuses what TensorRT refuses.

Each test drives ultrastyle's builder or runner into a case the real API
reports by a return value (a False, a 0, a None) or by its logger, and checks
that ultrastyle notices; the stand-in (tests/test_trt_fakes.py) answers those
cases the way TensorRT's headers and bindings say it does.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import test_trt_fakes as fakes
from test_backends import FLOAT32
from ultrastyle.export.bundle import export_bundle, read_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.models.zoo import sha256_file
from ultrastyle.runtime.backends.base import RunnerError
from ultrastyle.runtime.backends.tensorrt_backend import TensorRTRunner
from ultrastyle.trt import engines as eng
from ultrastyle.trt.build import BuildError, EngineFromNetwork, NetworkFromOnnx, build_engines
from ultrastyle.trt.device_memory import CudaPythonMemory, PyCudaMemory, open_device_memory
from ultrastyle.trt.env import TensorRTUnavailable, detect_features, tensorrt_logger
from ultrastyle.trt.profiles import requested_ranges

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(cd16x_dir):
    return load_cd_folder(cd16x_dir, stages=(1,))


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return export_bundle(model, tmp_path_factory.mktemp("strict") / "b", validate=False, spec=ExportSpec(stages=(1,)))


def _build(bundle, **kw):
    ranges = requested_ranges(bundle.arch, (1,), tile_min=None, tile_opt=64, tile_max=256, precision="fp32")
    return build_engines(bundle, precision="fp32", ranges=ranges, stages=(1,), **kw)


def _encode_matches(bundle, model, **runner_kw) -> TensorRTRunner:
    x = torch.rand(1, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    with TensorRTRunner(bundle, stages=(1,), **runner_kw) as r:
        f = r.encode(1, x)
        ref = model.encode(1, x)
        assert f.shape == ref.shape and (f - ref).abs().max() <= FLOAT32.features_bound(ref)
        c = bundle.arch.feature_channels(1)
        a, b = torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        y = r.stylize_core(1, x, a, b, slice(0, 40), slice(0, 24))
        assert (y - model.decode(1, ref, a, b)).abs().max() <= FLOAT32.image
        return r


def _tiny_graph(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "tiny", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _engine_from(fake, tmp_path, model: onnx.ModelProto, shapes: dict, tf32: bool = True):
    logger = tensorrt_logger(fake)
    features = detect_features(fake)
    build = EngineFromNetwork(fake, logger, features, workspace=1 << 20, timing_cache=tmp_path / "t.cache")
    return build(NetworkFromOnnx(fake, logger, features, model, "tiny.onnx"), shapes, precision="fp32", quantized=False, tf32=tf32)


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "H", "W"])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "H", "W"])
SHAPES = {"x": ((1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 32, 32))}


# -- 1. the timing cache ------------------------------------------------------------------


def test_a_refused_timing_cache_is_replaced_and_the_build_says_so(bundle, tmp_path, monkeypatch):
    fake = fakes.install(monkeypatch)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"a cache from another GPU")  # TensorRT's set_timing_cache answers False, get_timing_cache None
    said = []
    report = _build(bundle, timing_cache=cache, on_step=said.append)
    assert len(report.built) == 4 and eng.read_manifest(report.folder).host.tensorrt == fake.__version__
    assert any("refused the timing cache" in n for n in report.notes) and any("refused the timing cache" in s for s in said)
    assert cache.read_bytes().startswith(fakes.MAGIC)  # a cache TensorRT accepts next time
    again = _build(bundle, timing_cache=cache, force=True)
    assert again.notes == [] and cache.read_bytes() == fakes.MAGIC + b"t" * 8  # the fresh cache kept and grown


# -- 2. one logger --------------------------------------------------------------------------


def test_builder_parser_and_runtime_share_one_logger_that_writes_to_stderr(bundle, model, monkeypatch, capsys):
    fakes.install(monkeypatch)
    _build(bundle, force=True)
    _encode_matches(bundle, model)
    assert fakes.LOGGERS.conflicts == []  # TensorRT would have kept the first and warned
    assert not isinstance(fakes.LOGGERS.first, fakes.Logger)  # TensorRT's default Logger prints to stdout
    capsys.readouterr()
    fakes._log(fakes.ILogger.WARNING, "a TensorRT warning")
    fakes._log(fakes.ILogger.VERBOSE, "a verbose line")
    out = capsys.readouterr()
    assert "a TensorRT warning" in out.err and "a TensorRT warning" not in out.out and "a verbose line" not in out.err
    _build(bundle, force=True, verbose=True)  # verbose for the build, warnings again after it
    assert "building" in capsys.readouterr().err and fakes.LOGGERS.first.min_severity == fakes.ILogger.WARNING


# -- 3, 4. the runner's unchecked answers ------------------------------------------------------


def test_zero_from_the_memory_query_falls_back_to_the_profiles_size(bundle, model, monkeypatch):
    fakes.install(monkeypatch, memory_for_shapes_zero=True)  # NvInferRuntime.h: "0 if error occurred"
    _build(bundle)
    _encode_matches(bundle, model)
    with TensorRTRunner(bundle, stages=(1,)) as r:
        r.encode(1, torch.rand(1, 3, 8, 8))  # a small tile: the arena still holds the profile-wide size
        assert r.arena.nbytes >= r._nets["encoder1"].engine.device_memory_size_v2 > 1024 + 3 * 8 * 8


def test_a_refused_tensor_address_is_an_error_naming_the_tensor(bundle, monkeypatch):
    fakes.install(monkeypatch, refuse_address="features")
    _build(bundle)
    with TensorRTRunner(bundle, stages=(1,)) as r, pytest.raises(RunnerError, match=r"encoder1: TensorRT refused the device address .* 'features'"):
        r.encode(1, torch.rand(1, 3, 8, 8))


def test_an_engine_tensorrt_cannot_deserialize_is_refused_with_the_rebuild(bundle, monkeypatch):
    fakes.install(monkeypatch)
    _build(bundle)
    monkeypatch.setattr(fakes, "FAULTS", fakes.Faults(deserialize_none=True))  # e.g. a plan of another TensorRT build
    with TensorRTRunner(bundle, stages=(1,)) as r, pytest.raises(RunnerError, match=r"could not deserialize.*ultrastyle\.build_tensorrt\(.*force=True\)"):
        r.encode(1, torch.rand(1, 3, 8, 8))
    with pytest.raises(BuildError, match="cannot load the engine it built"):
        _build(bundle, force=True)


# -- 5. cuda-python's CUDA major ---------------------------------------------------------------


def test_cuda_python_the_driver_cannot_run_falls_back_to_pycuda(monkeypatch):
    monkeypatch.setattr(fakes, "FAULTS", fakes.Faults(set_device_error=35))  # cuda-python 13 on a pre-R580 driver
    fakes.install_cuda_bindings(monkeypatch, cuda_python=True, pycuda=True)
    mem = open_device_memory("auto")
    assert isinstance(mem, PyCudaMemory)
    mem.close()
    fakes.install_cuda_bindings(monkeypatch, cuda_python=True, pycuda=False)
    with pytest.raises(TensorRTUnavailable, match=r"CUDA error 35.*R580.*cuda-python>=12\.0,<13.*pycuda is not installed either"):
        open_device_memory("auto")


def test_the_tensorrt_extra_pins_one_cuda_major():
    from packaging.requirements import Requirement

    extra = {Requirement(r).name: Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]}
    assert set(extra) == {"tensorrt-cu12", "cuda-python"}  # TensorRT's CUDA 12 wheel, not whichever `tensorrt` picks
    cp = extra["cuda-python"].specifier
    assert cp.contains("12.9.0") and not cp.contains("13.0.0") and not cp.contains("12.5.0")


# -- 9. the stand-in refuses what TensorRT refuses -----------------------------------------------


def test_the_parser_applies_the_support_matrix_and_reports_through_get_error(monkeypatch, tmp_path, capsys):
    fake = fakes.install(monkeypatch)
    det = _tiny_graph([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Relu", ["x"], ["y"])],
                      [X], [Y, helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, 3])])  # fmt: skip
    custom = _tiny_graph([helper.make_node("Clamp", ["x"], ["y"], domain="com.example")], [X], [Y])
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    int8 = _tiny_graph([helper.make_node("Cast", ["x"], ["q"], to=TensorProto.INT8), helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)], [X], [Y])
    for graph, expect in ((det, r"node 0: Det is not supported"), (custom, "com.example"), (int8, r"node 0: Cast to INT8")):
        with pytest.raises(BuildError, match=f"parser rejected tiny.onnx: .*{expect}"):
            _engine_from(fake, tmp_path, graph, SHAPES)
    assert "Cast to INT8" in capsys.readouterr().err  # and through the logger, as TensorRT logs them


def test_the_builder_validates_the_profile(monkeypatch, tmp_path, capsys):
    fake = fakes.install(monkeypatch)
    ident = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])], [X], [Y])
    data, memory = _engine_from(fake, tmp_path, ident, SHAPES)
    assert memory == 1024 + 3 * 32 * 32
    with pytest.raises(BuildError, match="could not build tiny.onnx"):
        _engine_from(fake, tmp_path, ident, {})  # a dynamic input without a profile
    assert "does not define dimensions for dynamic input x" in capsys.readouterr().err
    with pytest.raises(BuildError, match="refused the profile of tiny.onnx for 'x'"):
        _engine_from(fake, tmp_path, ident, {"x": ((1, 3, 8, 8), (1, 3, 64, 64), (1, 3, 32, 32))})  # opt > max
    # two inputs sharing the named dimension "H" must be given the same range
    rows = helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["H"])
    two = _tiny_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["rows"], ["r"])],
                      [X, rows], [Y, helper.make_tensor_value_info("r", TensorProto.FLOAT, ["H"])])  # fmt: skip
    with pytest.raises(BuildError, match="could not build"):
        _engine_from(fake, tmp_path, two, {**SHAPES, "rows": ((8,), (16,), (64,))})
    assert "named dimension 'H'" in capsys.readouterr().err
    _engine_from(fake, tmp_path, two, {**SHAPES, "rows": ((8,), (16,), (32,))})


def test_engines_report_their_io_dtypes_and_the_runner_refuses_half(bundle, monkeypatch, tmp_path):
    fakes.install(monkeypatch)
    dst = tmp_path / "half"
    shutil.copytree(bundle.path, dst, ignore=shutil.ignore_patterns("engines"))
    g = onnx.load(dst / "encoder1.onnx")  # the image comes in as float16 (a graph converted without keep_io_types)
    g.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    for n in g.graph.node:
        n.input[:] = ["image_f32" if i == "image" else i for i in n.input]
    g.graph.node.insert(0, helper.make_node("Cast", ["image"], ["image_f32"], to=TensorProto.FLOAT))
    onnx.save(g, dst / "encoder1.onnx")
    mf = json.loads((dst / "manifest.json").read_text())
    mf["networks"]["encoder1"]["sha256"] = sha256_file(dst / "encoder1.onnx")
    (dst / "manifest.json").write_text(json.dumps(mf))
    half = read_bundle(dst)
    _build(half)
    with TensorRTRunner(half, stages=(1,)) as r, pytest.raises(RunnerError, match="'image' is half, the runner binds float32"):
        r.encode(1, torch.rand(1, 3, 8, 8))


def test_fake_engines_emulate_tf32_where_the_build_leaves_it_on(monkeypatch, tmp_path):
    fake = fakes.install(monkeypatch)
    w = np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32)
    conv = _tiny_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [X], [Y], [numpy_helper.from_array(w, "w")])
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    out = {}
    for tf32 in (True, False):
        data, _ = _engine_from(fake, tmp_path, conv, SHAPES, tf32=tf32)
        engine = fake.Runtime(tensorrt_logger(fake)).deserialize_cuda_engine(data)
        out[tf32] = engine.session.run(["y"], {"x": x})[0]
    ref = fakes.ort.InferenceSession(conv.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert np.abs(out[False] - ref).max() <= 1e-5  # TF32 off: IEEE float32
    assert 1e-5 < np.abs(out[True] - ref).max() <= 2e-3 * np.abs(ref).max()  # on: 10 mantissa bits


def test_the_tensorrt_10_0_memory_api(bundle, model, monkeypatch):
    fake = fakes.install(monkeypatch, api="10.0")  # device_memory attribute, device_memory_size
    features = detect_features(fake)
    assert not features.sized_set_device_memory and not features.device_memory_v2 and features.memory_for_shapes
    report = _build(bundle)
    assert "trt10.0.1" in report.folder.name
    r = _encode_matches(bundle, model)
    assert r.features.version == "10.0.1"


@pytest.mark.parametrize("binding,cls", [("cuda-python", CudaPythonMemory), ("pycuda", PyCudaMemory)])
def test_the_runner_on_ultrastyles_own_device_memory_classes(bundle, model, monkeypatch, binding, cls):
    fakes.install(monkeypatch, memory=binding)
    _build(bundle)
    before = set(fakes.DEVICE)
    r = _encode_matches(bundle, model)
    assert isinstance(r.mem, cls) and set(fakes.DEVICE) == before  # every device buffer given back
