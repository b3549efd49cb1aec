"""The TensorRT runner: the shared conformance suite, engine builds and staleness, device-side statistics.

Every test runs against ``fake`` (tests/test_trt_fakes.py: TensorRT's API over
ONNX Runtime, on the CPU: it exercises the builder, the engine folders and the
runner's data flow) and, marked ``gpu`` and ``tensorrt``, against the real
TensorRT on a GPU, skipped here with the reason saying what is missing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import test_trt_fakes as fakes
from test_backends import (  # the conformance suite every runner passes (collected here with this module's fixtures)
    FLOAT32,
    GPU_FLOAT32,
    TF32,
    test_runner_is_a_context_manager,
    test_runner_matches_torch_reference_on_every_stage_network,
    test_runner_refuses_infer_before_activate_and_double_activate,
    test_runner_rejects_unknown_networks,
    test_tiled_stylization_on_runner_matches_torch_whole_image_within_1e4,
)
from ultrastyle.cli.main import app
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.export.bundle import export_bundle, read_bundle
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.models.zoo import sha256_file
from ultrastyle.runtime.backends.base import RunnerError
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
from ultrastyle.runtime.backends.select import open_runner, resolve_backend
from ultrastyle.runtime.backends.tensorrt_backend import TensorRTRunner
from ultrastyle.trt import engines as eng
from ultrastyle.trt.build import build_engines
from ultrastyle.trt.env import missing_for_tensorrt
from ultrastyle.trt.profiles import requested_ranges

__all__ = [
    "test_runner_is_a_context_manager",
    "test_runner_matches_torch_reference_on_every_stage_network",
    "test_runner_refuses_infer_before_activate_and_double_activate",
    "test_runner_rejects_unknown_networks",
    "test_tiled_stylization_on_runner_matches_torch_whole_image_within_1e4",
]
TILE_MAX = 1024
GPU = [pytest.mark.gpu, pytest.mark.tensorrt]


def _require_real_tensorrt() -> None:
    missing = missing_for_tensorrt()
    if missing:
        pytest.skip("needs TensorRT on an NVIDIA GPU; missing here: " + "; ".join(missing))


@pytest.fixture(scope="module")
def model(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return export_bundle(model, tmp_path_factory.mktemp("trt") / "cd16x")


def _build(bundle, precision="fp32", **kw):
    ranges = requested_ranges(bundle.arch, bundle.stages, tile_min=None, tile_opt=512, tile_max=TILE_MAX, precision=precision)
    return build_engines(bundle, precision=precision, ranges=ranges, **kw)


@pytest.fixture(params=["fake", pytest.param("gpu", marks=GPU)])
def backend(request, monkeypatch):
    if request.param == "gpu":
        _require_real_tensorrt()
    else:
        fakes.install(monkeypatch)
    return request.param


@pytest.fixture
def tol(backend):
    """IEEE float32 engines (TF32 off): the stand-in computes what ONNX Runtime does, a GPU within another device's float32."""
    return GPU_FLOAT32 if backend == "gpu" else FLOAT32


@pytest.fixture
def runner(backend, bundle) -> TensorRTRunner:
    _build(bundle)
    return TensorRTRunner(bundle)


@pytest.fixture
def fake(monkeypatch):
    return fakes.install(monkeypatch)


# -- engines: build, keep, rebuild ------------------------------------------------------


def test_build_writes_every_engine_once_then_keeps_them(bundle, fake, tmp_path):
    # Its own copy, without engines: what earlier tests built in the module's bundle is not this test's first build.
    shutil.copytree(bundle.path, tmp_path / "own", ignore=shutil.ignore_patterns("engines"))
    bundle = read_bundle(tmp_path / "own")
    cache = tmp_path / "timing.cache"
    builds = fakes.Builder.builds
    first = _build(bundle, timing_cache=cache)
    host = eng.Host(fakes.FAKE_GPU.name, fakes.FAKE_GPU.compute_capability, fake.__version__)
    assert first.folder == eng.engine_dir(bundle.path, host)
    manifest = eng.read_manifest(first.folder)
    expected = {f"{kind}{k}.fp32" for kind in ("encoder", "decoder", "decoder_affine", "stats") for k in range(1, 6)}
    assert set(manifest.engines) == expected and set(first.built) == expected and first.fresh == []
    assert fakes.Builder.builds == builds + len(expected)  # each once
    e = manifest.engines["encoder5.fp32"]
    assert e.graph_sha256 == bundle.manifest["networks"]["encoder5"]["sha256"]
    assert e.profile["image"]["max"] == [1, 3, 1024, 1024] and e.tiles == {"min": 32, "opt": 512, "max": 1024}
    assert manifest.engines["stats5.fp32"].settings["tf32"] is False  # the statistics GEMM keeps float32's mantissa
    assert manifest.engines["encoder5.fp32"].settings["tf32"] is False  # IEEE float32 unless build_engines(tf32=True)
    assert manifest.to_json()["driver"] == {"cuda": "12.8", "nvidia": "570.0"}
    size = cache.stat().st_size  # written by the first build
    builds = fakes.Builder.builds
    again = _build(bundle, timing_cache=cache)
    assert again.built == [] and set(again.fresh) == expected and fakes.Builder.builds == builds
    forced = _build(bundle, timing_cache=cache, force=True, stages=(1,))
    assert len(forced.built) == 4 and cache.stat().st_size == size + 4  # the timing cache persists and grows


def test_changed_graph_is_rebuilt_and_never_run(bundle, fake, tmp_path):
    _build(bundle)
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    import onnx

    g = onnx.load(dst / "decoder1.onnx")
    bias = next(i for i in g.graph.initializer if i.name.endswith(".bias"))
    bias.raw_data = (np.frombuffer(bias.raw_data, np.float32) + 0.5).astype(np.float32).tobytes()
    onnx.save(g, dst / "decoder1.onnx")
    mf = json.loads((dst / "manifest.json").read_text())
    mf["networks"]["decoder1"]["sha256"] = sha256_file(dst / "decoder1.onnx")
    (dst / "manifest.json").write_text(json.dumps(mf))
    copy = read_bundle(dst)
    with pytest.raises(RunnerError, match=r"decoder1\.fp32: its graph changed since the build.*ultrastyle\.build_tensorrt\(.*precision=.fp32.\)"):
        TensorRTRunner(copy).activate()
    assert resolve_backend("auto", "cpu", dst, stages=(1,)) == "onnxruntime"  # stale engines: auto does not take them
    report = _build(copy)
    assert report.built == ["decoder1.fp32"] and "its graph changed" in report.reasons["decoder1.fp32"][0]
    assert resolve_backend("auto", "cpu", dst, stages=(1,)) == "tensorrt"


def test_foreign_engines_are_not_run(bundle, fake, tmp_path):
    _build(bundle)
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    host = eng.Host(fakes.FAKE_GPU.name, fakes.FAKE_GPU.compute_capability, fake.__version__)
    folder = eng.engine_dir(dst, host)
    manifest = eng.read_manifest(folder)
    manifest.host = eng.Host("NVIDIA A100-SXM4-80GB", (8, 0), fake.__version__)  # a folder copied from another machine
    eng.write_manifest(folder, manifest)
    with pytest.raises(RunnerError, match="built for NVIDIA A100"):
        TensorRTRunner(read_bundle(dst)).activate()
    from ultrastyle.trt.check import check_bundle

    report = check_bundle(read_bundle(dst))
    assert report.ok and any("does not match its manifest" in f.message for f in report.warnings)


def test_cli_build_builds_then_reports_up_to_date(bundle, fake):
    args = ["build", str(bundle.path), "--stages", "2", "--tile-max", "512", "--precision", "fp16"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "4 engine(s) built" in r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "0 engine(s) built, 4 up to date" in r.output, r.output


def test_tensorrt_backend_builds_missing_engines_on_first_use(bundle, fake, tmp_path):
    dst = tmp_path / "fresh"
    shutil.copytree(bundle.path, dst, ignore=shutil.ignore_patterns("engines"))
    said = []
    runner = open_runner(dst, backend="tensorrt", stages=(1, 2), on_export=said.append)
    assert isinstance(runner, TensorRTRunner) and any("first use" in s for s in said)
    assert resolve_backend("auto", "cpu", dst, stages=(1, 2)) == "tensorrt"
    assert resolve_backend("auto", "cpu", dst, stages=(1, 2), precision="fp16") == "onnxruntime"  # not built at fp16
    with runner:
        assert runner.encode(1, torch.rand(1, 3, 8, 8)).shape == (1, 24, 8, 8)


# -- the runner's data flow --------------------------------------------------------------


def test_pass1_statistics_come_back_as_c_plus_c2_numbers(bundle, model, fake, monkeypatch):
    _build(bundle)
    fetched = []
    real = fakes.FakeMemory.copy_dtoh
    monkeypatch.setattr(fakes.FakeMemory, "copy_dtoh", lambda self, dst, src, n, s: (fetched.append(n), real(self, dst, src, n, s)))
    x = torch.rand(1, 3, 8 * 8, 6 * 8)
    rows, cols = slice(1, 7), slice(2, 5)
    with TensorRTRunner(bundle) as r:
        stats, core = r.encode_core_statistics(4, x, rows, cols, keep_features=False)
        assert core is None
        c = 128
        assert sum(fetched) == (c + c * c + 1) * 4  # no feature map left the "device"
        fetched.clear()
        stats_k, core_k = r.encode_core_statistics(4, x, rows, cols, keep_features=True)
        assert sum(fetched) == (c + c * c + 1 + c * 8 * 6) * 4
    ref = FeatureStats.of(model.encode(4, x)[..., rows, cols])
    assert stats.count == ref.count == stats_k.count == 18
    assert torch.allclose(stats.sum, ref.sum, rtol=1e-4, atol=1e-3)
    assert (stats.covariance() - ref.covariance()).abs().max() <= 1e-3 * ref.covariance().abs().max()
    assert (core_k - model.encode(4, x)[..., rows, cols]).abs().max() <= 3e-4


def test_stylize_core_keeps_features_on_the_device(bundle, model, fake, monkeypatch):
    _build(bundle)
    fetched = []
    real = fakes.FakeMemory.copy_dtoh
    monkeypatch.setattr(fakes.FakeMemory, "copy_dtoh", lambda self, dst, src, n, s: (fetched.append(n), real(self, dst, src, n, s)))
    x = torch.rand(1, 3, 64, 48)
    c = 64
    a = torch.eye(c, dtype=torch.float64) * 0.8
    b = torch.full((c,), 0.05, dtype=torch.float64)
    with TensorRTRunner(bundle) as r:
        y = r.stylize_core(3, x, a, b, slice(8, 40), slice(4, 44))
        assert fetched == [3 * 64 * 48 * 4]  # only the image came back
        held = r.memory_bytes()
        r.stylize_core(3, torch.rand(1, 3, 32, 32), a, b, slice(0, 32), slice(0, 32))
        assert r.memory_bytes() == held  # buffers are sized by the largest tile, smaller ones reuse them
    ref = model.decode(3, model.encode(3, x), a, b)[..., 8:40, 4:44]
    assert y.shape == ref.shape and (y - ref).abs().max() <= 1e-4


def test_tiles_outside_the_profile_are_refused_with_the_fix(bundle, fake):
    _build(bundle)
    from ultrastyle.cli.remedies import as_command

    with TensorRTRunner(bundle) as r, pytest.raises(RunnerError, match=r"outside the engine's profile.*build_tensorrt\(.*tile_max=N\)") as info:
        r.encode(1, torch.rand(1, 3, 8, TILE_MAX + 8))
    assert f"ultrastyle build {bundle.path} --precision fp32 --tile-max N" in as_command(info.value)  # what the CLI prints
    with TensorRTRunner(bundle) as r, pytest.raises(RunnerError, match=r"below the engine's profile.*smaller than.*tile_min=N") as info:
        r.encode(5, torch.rand(1, 3, 16, 64))  # stage 5's profile starts at 2 x its 16-px grid
    assert "--tile-min N" in as_command(info.value)


def test_tiled_stylization_fits_its_tiles_to_the_profiles_without_being_asked(bundle, model, fake, shared_dir):
    # A library caller passes plain options: a 1200-px strip at the 2 GB default would plan 1200-px regions.
    from ultrastyle.core.canvas import canvas_from_array
    from ultrastyle.io.images import load_image, resize_long_side
    from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
    from ultrastyle.core.plan import TilingOptions, plan_stage
    from ultrastyle.runtime.tiled import plan_image_for, stylize_tiled

    _build(bundle)
    content = resize_long_side(load_image(shared_dir / "images/content/cd_content_in1.jpg"), 1200)[:, 100:356]
    h, w = content.shape[1:]
    style_image = resize_long_side(load_image(shared_dir / "images/style/cd_style_in4.jpg"), 128)
    options = TilingOptions()
    unfitted = plan_stage(bundle.arch, 5, h, w, replace(options, whole_if_area_fits=False))
    assert max(t.region_cols.stop - t.region_cols.start for t in unfitted.encode_tiles()) > TILE_MAX
    with TensorRTRunner(bundle) as r:
        style = style_statistics(r, style_image, DEFAULT_LEVELS)
        for plan in plan_image_for(r, h, w, DEFAULT_LEVELS, options).stages:
            k = plan.stage
            widths = [t.region_cols.stop - t.region_cols.start for t in plan.encode_tiles()]
            if not plan.cache:
                widths += [t.region_cols.stop - t.region_cols.start for t in plan.decode_tiles()]
            assert max(widths) <= TILE_MAX, (k, widths)
        with canvas_from_array(content.numpy(), layout="chw") as cv:
            out = stylize_tiled(r, cv, style, options, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
            got = torch.from_numpy(out.numpy().copy())
            out.close()
    with OnnxRuntimeRunner(bundle) as ort:  # the same graphs on the whole image: only the tiling differs
        ref = stylize(ort, content, style)
    # The engines sum the statistics in float32 (the stats graph), the reference in float64: 9.5e-5 here.
    assert (got.clamp(0, 1) - ref.clamp(0, 1)).abs().max() <= 2e-4


def test_fp16_engines_within_2e2_of_pytorch(bundle, model, backend):
    _build(bundle, "fp16", stages=(1, 3, 5))
    gen = torch.Generator().manual_seed(0)
    with TensorRTRunner(bundle, precision="fp16", stages=(1, 3, 5)) as r:
        for k in (1, 3, 5):
            g = bundle.arch.grid(k)
            x = torch.rand(1, 3, 6 * g, 4 * g, generator=gen)
            c = bundle.arch.feature_channels(k)
            a = torch.eye(c, dtype=torch.float64) * 0.7
            b = torch.zeros(c, dtype=torch.float64)
            f = r.encode(k, x)
            ref_f = model.encode(k, x)
            assert (f - ref_f).abs().max() <= 2e-2 * max(1.0, ref_f.abs().max().item())
            assert (r.decode(k, ref_f, a, b) - model.decode(k, ref_f, a, b)).abs().max() <= 2e-2


def test_fp32_engines_match_pytorch_and_tf32_ones_do_not(bundle, model, backend, tol, tmp_path):
    # This held TF32 engines to 1e-3: under the stand-in's TF32 emulation the stage 4-5 decoders are 3e-3 off.
    # Its own copy (engines built so far included): the TF32 rebuild below must not reach the module's bundle.
    shutil.copytree(bundle.path, tmp_path / "own")
    bundle = read_bundle(tmp_path / "own")
    _build(bundle)
    gen = torch.Generator().manual_seed(1)
    with TensorRTRunner(bundle) as r:
        for k in (1, 2, 3, 4, 5):
            g = bundle.arch.grid(k)
            x = torch.rand(1, 3, 7 * g, 5 * g, generator=gen)
            c = bundle.arch.feature_channels(k)
            a = torch.eye(c, dtype=torch.float64) * 0.7
            b = torch.zeros(c, dtype=torch.float64)
            ref_f = model.encode(k, x)
            assert (r.encode(k, x) - ref_f).abs().max() <= tol.features_bound(ref_f)
            assert (r.decode(k, ref_f, a, b) - model.decode(k, ref_f, a, b)).abs().max() <= tol.image
    _build(bundle, stages=(5,), force=True, tf32=True)  # opted in: TF32's own tolerance, and outside float32's
    with TensorRTRunner(bundle, stages=(5,)) as r:
        ref_f = model.encode(5, x)
        ref_y = model.decode(5, ref_f, a, b)
        df, dy = (r.encode(5, x) - ref_f).abs().max(), (r.decode(5, ref_f, a, b) - ref_y).abs().max()
        assert df <= TF32.features_bound(ref_f) and dy <= TF32.image
        assert dy > tol.image  # what TF32 costs: why it is off by default


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.slow
def test_40mp_tiled_stylization_stays_under_2gb_of_device_memory(bundle, model):
    _require_real_tensorrt()
    from ultrastyle.core.canvas import canvas_from_array
    from ultrastyle.runtime.cascade import DEFAULT_LEVELS
    from ultrastyle.core.plan import TilingOptions
    from ultrastyle.runtime.tiled import stylize_tiled
    from ultrastyle.trt.profiles import default_ranges

    budget = 2 * 2**30
    build_engines(bundle, precision="fp32", ranges=default_ranges(bundle.arch, bundle.stages, "fp32", budget))
    h, w = 5200, 7800  # 40.6 MP
    yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32), np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
    content = np.stack([yy, xx, (yy * xx)])
    style = {k: FeatureStats.of(model.encode(k, torch.rand(1, 3, 256, 256))) for k in DEFAULT_LEVELS}
    runner = TensorRTRunner(bundle)
    free0, _ = _mem_info()
    peak = [0]

    def on_tile(*_):
        free, _ = _mem_info()
        peak[0] = max(peak[0], free0 - free)

    with runner:
        options = TilingOptions(max_memory=budget)  # the plans fit the engines' profiles (`TensorRTRunner.traits`)
        with canvas_from_array(content, layout="chw") as cv:
            out = stylize_tiled(runner, cv, style, options, method="wct", alpha=0.6, levels=DEFAULT_LEVELS, on_tile=on_tile)
            out.close()
    assert 0 < peak[0] <= budget, f"device memory in use reached {peak[0] / 2**30:.2f} GiB"


def _mem_info() -> tuple[int, int]:
    from ultrastyle.trt.device_memory import open_device_memory

    mem = open_device_memory()
    try:
        return mem.mem_info()
    finally:
        mem.close()
