"""CPU tests of the TensorRT path's pure parts: profiles, engine folders and staleness, fp16 conversion, the statistics graph."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ultrastyle.cli.remedies import as_command
from ultrastyle.core.arch import ARCHS
from ultrastyle.core.plan import TilingOptions, plan_image, plan_stages
from ultrastyle.core.traits import RunnerTraits
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.errors import Setting
from ultrastyle.export.stats_graph import STATS_OUTPUTS, build_stats_graph, stats_from_outputs, window_masks
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.trt import engines as eng
from ultrastyle.trt.device_memory import open_device_memory
from ultrastyle.trt.env import TensorRTUnavailable, detect_features
from ultrastyle.trt.fp16 import convert_to_fp16, is_fp16_graph
from ultrastyle.trt.memory_model import memory_factor
from ultrastyle.trt.profiles import (
    TileRange,
    default_ranges,
    max_core_for_profile,
    network_shapes,
    plan_region,
    profile_problems,
    region_for_core,
    requested_ranges,
    stage_range,
)

SPEC = ARCHS["cd16x"]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


# -- profiles ---------------------------------------------------------------------------


def test_stage_range_rounds_to_the_grid_and_keeps_min_at_two_cells():
    assert stage_range(SPEC, 5, TileRange(1, 1000, 1000)) == TileRange(32, 992, 992)
    assert stage_range(SPEC, 3, TileRange(9, 13, 102)) == TileRange(12, 12, 100)  # grid 4
    assert stage_range(SPEC, 1, TileRange(1, 7, 5)) == TileRange(2, 5, 5)  # opt above max is clamped


def test_network_shapes_are_the_region_at_each_networks_resolution():
    rng = TileRange(32, 512, 1024)
    enc = network_shapes("encoder", 5, SPEC, rng)["image"]
    assert enc == ((1, 3, 32, 32), (1, 3, 512, 512), (1, 3, 1024, 1024))
    dec = network_shapes("decoder_affine", 5, SPEC, rng)
    assert dec["features"] == ((1, 128, 2, 2), (1, 128, 32, 32), (1, 128, 64, 64)) and dec["A"] == ((128, 128),) * 3
    st = network_shapes("stats", 5, SPEC, rng)
    assert st["row_mask"][2] == (64,) and st["features"] == dec["features"]


def _tensorrt_traits(precision: str, max_regions: dict[int, int] | None = None) -> RunnerTraits:
    """A `TensorRTRunner`'s traits, without engines or a GPU."""
    return RunnerTraits(
        budget_memory="device", bounded_regions=True, max_regions=max_regions or {},
        memory_factors={k: memory_factor(SPEC, k, precision) for k in range(1, 6)},
    )  # fmt: skip


def test_default_profile_covers_every_region_the_planner_makes():
    opts = TilingOptions()
    for precision in ("fp32", "fp16"):
        ranges = default_ranges(SPEC, (1, 2, 3, 4, 5), precision)
        for k, rng in ranges.items():
            assert not profile_problems(SPEC, k, rng), (k, rng)
            # small, odd, large; and a wide strip whose area fits the budget, but not its side
            for h, w in ((97, 97), (3000, 3000), (8192, 8192), (600, 6000)):
                (plan,) = plan_stages(SPEC, h, w, (k,), opts, _tensorrt_traits(precision))
                scale = plan.grid if plan.cache else 1  # cached pass-2 tiles are in feature pixels
                regions = [(t.region_rows.size, t.region_cols.size) for t in plan.encode_tiles()]
                regions += [(t.region_rows.size * scale, t.region_cols.size * scale) for t in plan.decode_tiles()]
                assert max(max(r) for r in regions) <= rng.max, (k, h, w)
                assert min(min(r) for r in regions) >= rng.min, (k, h, w)


def test_profile_problems_name_grid_min_and_halo():
    probs = " ".join(profile_problems(SPEC, 5, TileRange(4, 100, 100)))
    assert "not a multiple of the stage's grid 16" in probs and "below 2 x grid" in probs and "(tile_max)" in probs
    assert profile_problems(SPEC, 4, TileRange(16, 512, 512)) == []


def test_cores_fit_their_profile_exactly():
    opts = TilingOptions()
    for k in (1, 3, 5):
        core = max_core_for_profile(SPEC, k, 1024, opts)
        assert core > 0 and region_for_core(SPEC, k, core, opts) <= 1024 < region_for_core(SPEC, k, core + SPEC.grid(k), opts)


def test_requested_ranges_use_the_cli_values_on_each_grid():
    r = requested_ranges(SPEC, (1, 5), tile_min=None, tile_opt=None, tile_max=1000)
    assert r[1] == TileRange(2, 1000, 1000) and r[5] == TileRange(32, 992, 992)
    default = requested_ranges(SPEC, (5,), tile_min=None, tile_opt=None, tile_max=None)[5]
    above = default.max + 32 * 40
    r = requested_ranges(SPEC, (5,), tile_min=None, tile_opt=above, tile_max=None)
    assert r[5].opt == r[5].max == above  # an opt above the default max raises it, as tile_max raises opt: never clipped unsaid
    r = requested_ranges(SPEC, (5,), tile_min=above, tile_opt=None, tile_max=None)
    assert r[5].min == r[5].opt == r[5].max == above


def test_tiles_shrink_to_fit_the_engines_and_never_grow():
    opts = TilingOptions(max_memory=8 * 2**30)
    levels = (5, 4, 3, 2, 1)
    unlimited = plan_image(SPEC, 8192, 8192, levels, opts, _tensorrt_traits("fp32"))
    big = plan_image(SPEC, 8192, 8192, levels, opts, _tensorrt_traits("fp32", {k: 1 << 20 for k in levels}))
    assert big.stages == unlimited.stages  # the budget's tiles fit: unchanged
    assert not big.options.whole_if_area_fits  # and never one whole wide image past a profile's side
    small = plan_image(SPEC, 8192, 8192, levels, opts, _tensorrt_traits("fp32", {k: 768 for k in levels}))
    for p, q in zip(small.stages, unlimited.stages):
        assert plan_region(p) <= 768 and p.encode_core <= q.encode_core and p.decode_core <= q.decode_core
    with pytest.raises(ValueError, match="engines built for"):
        plan_image(SPEC, 8192, 8192, levels, TilingOptions(tile=2048), _tensorrt_traits("fp32", {k: 768 for k in levels}))
    with pytest.raises(ValueError, match="too small"):
        plan_image(SPEC, 8192, 8192, levels, opts, _tensorrt_traits("fp32", {k: 64 for k in levels}))


def test_memory_model_is_below_eager_pytorch_and_fp16_halves_the_activations_not_the_float32_io():
    # fp16 halves the activation peak; the runner's float32 image and feature buffers stay as they
    # are, so the model puts an fp16 tile at 0.56 (stage 5, where they matter least) to 0.79 (stage 1)
    # of an fp32 one. A model that stopped halving the activations would give 1.0.
    ratios = []
    for k in (1, 2, 3, 4, 5):
        f32, f16 = memory_factor(SPEC, k, "fp32"), memory_factor(SPEC, k, "fp16")
        assert 0.1 < f16 < f32 < 1.0, (k, f16, f32)
        ratios.append(f16 / f32)
    assert all(0.55 <= r <= 0.8 for r in ratios), ratios


# -- engine folders -----------------------------------------------------------------------

HOST = eng.Host("NVIDIA H100 80GB HBM3", (9, 0), "10.8.0.43")


def test_engine_folder_name_and_timing_cache_key():
    assert HOST.folder_name == "nvidia-h100-80gb-hbm3_sm90_trt10.8.0.43"
    assert eng.engine_dir("/b", HOST).as_posix() == "/b/engines/nvidia-h100-80gb-hbm3_sm90_trt10.8.0.43"
    assert eng.engine_file("encoder3", "fp16") == "encoder3.fp16.engine"
    other = eng.Host("NVIDIA GeForce RTX 4090", (8, 9), "11.4.0.106")
    assert eng.timing_cache_path(HOST).name != eng.timing_cache_path(other).name
    assert eng.timing_cache_path(HOST).name == f"timing_{HOST.folder_name}.cache"
    assert eng.timing_cache_path(HOST, "/x/t.cache").as_posix() == "/x/t.cache"


def _manifest_with_engine(folder, data=b"plan", graph_sha="g" * 64, tiles_max=1024, built_here=True) -> eng.EngineManifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "encoder3.fp32.engine").write_bytes(data)
    import hashlib

    if built_here:  # as `build` records each engine it writes
        eng.record_built(hashlib.sha256(data).hexdigest())

    m = eng.EngineManifest(HOST, "12.8", "570.1")
    m.engines["encoder3.fp32"] = eng.EngineEntry(
        "encoder3", "fp32", "encoder3.fp32.engine", hashlib.sha256(data).hexdigest(), graph_sha, "encoder3.onnx",
        {"image": {"min": [1, 3, 8, 8], "opt": [1, 3, 512, 512], "max": [1, 3, 1024, 1024]}},
        {"min": 8, "opt": 512, "max": tiles_max},
    )  # fmt: skip
    eng.write_manifest(folder, m)
    return m


def test_manifest_round_trips_and_fresh_engine_has_no_reasons(tmp_path):
    folder = tmp_path / eng.ENGINES_DIR / HOST.folder_name
    m = _manifest_with_engine(folder)
    again = eng.read_manifest(folder)
    assert again is not None and again.to_json()["engines"] == m.to_json()["engines"] and again.host == HOST
    assert eng.stale_reasons(again, folder, "encoder3", "fp32", host=HOST, graph_sha256="g" * 64, need_region=1024) == []


def test_stale_reasons_cover_every_way_an_engine_goes_bad(tmp_path):
    folder = tmp_path / "f"
    m = _manifest_with_engine(folder)
    reasons = lambda **kw: " | ".join(eng.stale_reasons(m, folder, "encoder3", "fp32", **{"host": HOST, "graph_sha256": "g" * 64, **kw}))  # noqa: E731
    assert "changed since the build" in reasons(graph_sha256="h" * 64)
    assert "built for NVIDIA H100" in reasons(host=eng.Host("NVIDIA A100", (8, 0), "10.8.0.43"))
    assert "TensorRT 10.8.0.43" in reasons(host=eng.Host(HOST.gpu, HOST.compute_capability, "11.0.0"))
    assert "2048-px tiles are planned" in reasons(need_region=2048)
    assert "not built" in " ".join(eng.stale_reasons(m, folder, "encoder3", "fp16", host=HOST, graph_sha256="g" * 64))
    assert "no engine manifest" in " ".join(eng.stale_reasons(None, folder, "encoder3", "fp32", host=HOST, graph_sha256="x"))
    (folder / "encoder3.fp32.engine").write_bytes(b"plan, truncated")
    assert "does not match its recorded sha256" in reasons()
    (folder / "encoder3.fp32.engine").unlink()
    assert "is missing" in reasons()


def test_an_engine_this_user_did_not_build_is_stale_whatever_its_manifest_says(tmp_path):
    """Engines are native code (TensorRT runs what it deserializes): one that came in a bundle is built again, not run."""
    folder = tmp_path / "f"
    m = _manifest_with_engine(folder, data=b"a plan from elsewhere", built_here=False)  # its sha256 matches its manifest
    reasons = eng.stale_reasons(m, folder, "encoder3", "fp32", host=HOST, graph_sha256="g" * 64)
    assert len(reasons) == 1 and "was not built by this user's ultrastyle" in reasons[0]
    eng.record_built(m.engines["encoder3.fp32"].sha256)  # built here (another engine's record does not count)
    eng.record_built("0" * 64)
    assert eng.stale_reasons(m, folder, "encoder3", "fp32", host=HOST, graph_sha256="g" * 64) == []
    assert eng.built_record().read_text().split() == [m.engines["encoder3.fp32"].sha256, "0" * 64]
    assert eng.built_record().parent == eng.timing_cache_path(HOST).parent  # the user's home, outside the bundle
    with pytest.raises(ValueError, match="64 hex digits"):
        eng.record_built("../../etc\nx")


def test_damaged_or_newer_manifest_is_refused_with_the_rebuild_command(tmp_path):
    folder = tmp_path / "b" / "engines" / HOST.folder_name
    folder.mkdir(parents=True)
    (folder / eng.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable engine manifest") as info:
        eng.read_manifest(folder)
    assert f"ultrastyle.build_tensorrt({str(tmp_path / 'b')!r})" in str(info.value)  # Python in the library's message
    assert f"ultrastyle build {tmp_path / 'b'}" in as_command(info.value)  # the command in the CLI's
    (folder / eng.MANIFEST).write_text('{"format": "ultrastyle-engines", "format_version": 99}')
    with pytest.raises(ValueError, match="version <= 1"):
        eng.read_manifest(folder)
    crafted = _manifest_with_engine(folder).to_json()
    crafted["engines"]["encoder3.fp32"]["file"] = "../../../elsewhere.engine"  # an engine is code to TensorRT: never from outside
    (folder / eng.MANIFEST).write_text(json.dumps(crafted))
    with pytest.raises(ValueError, match=r"names a file outside the engine folder: '\.\./\.\./\.\./elsewhere\.engine'"):
        eng.read_manifest(folder)


# -- fp16 conversion ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir, stages=(2, 4))


@pytest.mark.parametrize("stage", [2, 4])
def test_fp16_graphs_keep_float32_io_and_stay_close_to_fp32(cd16x, stage):
    from ultrastyle.export.graph import build_graph
    from ultrastyle.export.spec import ExportSpec

    specs = {s.kind: s for s in ExportSpec(stages=(stage,)).networks({stage: SPEC.feature_channels(stage)})}
    g = SPEC.grid(stage)
    rng = np.random.default_rng(stage)
    x = rng.random((1, 3, 6 * g, 5 * g), dtype=np.float32)
    enc32 = build_graph(cd16x.encoders[stage], specs["encoder"], opset=17)
    enc16 = convert_to_fp16(enc32)
    assert is_fp16_graph(enc16) and not is_fp16_graph(enc32)
    for vi in list(enc16.graph.input) + list(enc16.graph.output):
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    f32 = _session(enc32).run(None, {"image": x})[0]
    f16 = _session(enc16).run(None, {"image": x})[0]
    assert f16.dtype == np.float32 and np.abs(f16 - f32).max() <= 2e-2 * max(1.0, np.abs(f32).max())
    c = SPEC.feature_channels(stage)
    a = (np.eye(c) * 0.7 + rng.standard_normal((c, c)) * 0.02).astype(np.float32)
    b = (rng.standard_normal(c) * 0.1).astype(np.float32)
    dec32 = build_graph(cd16x.decoders[stage], specs["decoder_affine"], opset=17)
    feed = {"features": f32, "A": a, "b": b}
    y32 = _session(dec32).run(None, feed)[0]
    y16 = _session(convert_to_fp16(dec32)).run(None, feed)[0]
    assert np.abs(y16 - y32).max() <= 2e-2  # images in [0, 1]: the fp16 tolerance of the GPU tests


# -- the statistics graph ------------------------------------------------------------------


@pytest.mark.parametrize("c,h,w,rows,cols", [(16, 13, 9, slice(2, 11), slice(1, 8)), (64, 8, 20, slice(0, 8), slice(5, 20)), (128, 2, 2, slice(0, 2), slice(0, 2))])
def test_stats_graph_matches_feature_stats_under_onnxruntime(c, h, w, rows, cols):
    model = build_stats_graph(c)
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(c)
    # relu features with a large mean next to their spread: where an uncentred float32 Σffᵀ would lose the covariance
    f = (rng.standard_exponential((1, c, h, w)) * 2 + 40).astype(np.float32)
    rm, cm = window_masks(h, w, rows, cols)
    out = dict(zip(STATS_OUTPUTS, _session(model).run(list(STATS_OUTPUTS), {"features": f, "row_mask": rm, "col_mask": cm})))
    got = stats_from_outputs(out["sum"], out["outer"], out["count"])
    ref = FeatureStats.of(torch.from_numpy(f)[..., rows, cols])
    assert got.count == ref.count
    assert torch.allclose(got.sum, ref.sum, rtol=1e-5)
    if ref.count > 1:
        cov_ref = ref.covariance()
        assert (got.covariance() - cov_ref).abs().max() <= 1e-4 * cov_ref.abs().max()


def test_stats_from_outputs_merges_like_feature_stats():
    f = torch.rand(1, 8, 6, 6, dtype=torch.float32) * 10
    parts = []
    for rows in (slice(0, 3), slice(3, 6)):
        m = build_stats_graph(8)
        rm, cm = window_masks(6, 6, rows, slice(0, 6))
        o = _session(m).run(list(STATS_OUTPUTS), {"features": f.numpy(), "row_mask": rm, "col_mask": cm})
        parts.append(stats_from_outputs(*o))
    merged, ref = parts[0] + parts[1], FeatureStats.of(f)
    assert merged.count == ref.count and torch.allclose(merged.outer, ref.outer, rtol=1e-5)


# -- environment probes ---------------------------------------------------------------------


def test_device_memory_without_a_cuda_binding_says_how_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_cuda(name, *a, **k):
        if name.startswith(("cuda", "pycuda")):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_cuda)
    with pytest.raises(TensorRTUnavailable, match=r"ultrastyle\[tensorrt\]"):
        open_device_memory("auto")
    with pytest.raises(TensorRTUnavailable, match="pycuda"):
        open_device_memory("pycuda")
    with pytest.raises(ValueError, match="cuda-python, pycuda"):
        open_device_memory("cupy")


def test_feature_detection_tells_tensorrt_10_from_11():
    import types

    def fake(**names):
        return types.SimpleNamespace(**{k: types.SimpleNamespace(**{a: 0 for a in v}) for k, v in names.items()}, __version__="x")

    trt10 = fake(BuilderFlag=["FP16", "INT8", "TF32"], NetworkDefinitionCreationFlag=["STRONGLY_TYPED", "EXPLICIT_BATCH"],
                 ICudaEngine=["device_memory_size", "device_memory_size_v2"], IBuilderConfig=["int8_calibrator"],
                 IExecutionContext=["set_device_memory", "update_device_memory_size_for_shapes"])  # fmt: skip
    trt11 = fake(BuilderFlag=["TF32"], NetworkDefinitionCreationFlag=["STRONGLY_TYPED"], ICudaEngine=["device_memory_size_v2"],
                 IBuilderConfig=[], IExecutionContext=["set_device_memory", "update_device_memory_size_for_shapes"])  # fmt: skip
    f10, f11 = detect_features(trt10), detect_features(trt11)
    assert f10.weak_typing_flags and f10.int8_calibrator and f10.strongly_typed_flag
    assert not f11.weak_typing_flags and not f11.int8_calibrator and f11.device_memory_v2 and f11.tf32_flag


def test_tile_sides_out_of_order_are_refused():
    from ultrastyle.core.arch import ARCHS
    from ultrastyle.trt.profiles import requested_ranges

    with pytest.raises(ValueError, match="tile_min=512 is above tile_max=64") as info:
        requested_ranges(ARCHS["cd16x"], (1, 2), tile_min=512, tile_opt=None, tile_max=64)
    assert info.value.remedy == (Setting("tile_min", 512), Setting("tile_max", 64))  # a front end shows them its way
    with pytest.raises(ValueError, match="tile_opt=1000 is above tile_max=64"):
        requested_ranges(ARCHS["cd16x"], (1,), tile_min=None, tile_opt=1000, tile_max=64)


def test_the_tensorrt_backend_unavailable_names_the_cpu_backend_as_a_keyword_or_a_flag(cd16x_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import ultrastyle
    import ultrastyle.trt.env as env
    from ultrastyle.cli.main import app

    monkeypatch.setattr(env, "missing_for_tensorrt", lambda: ["an NVIDIA GPU"])  # as here, wherever the test runs

    with pytest.raises(TensorRTUnavailable, match=r"give backend='onnxruntime' to run on the CPU$"):
        ultrastyle.load(cd16x_dir, backend="tensorrt")
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "c.png")
    r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), "-s", str(tmp_path / "c.png"), "-m", str(cd16x_dir),
                                 "--backend", "tensorrt", "-o", str(tmp_path / "out")])  # fmt: skip
    assert r.exit_code == 2 and "give --backend onnxruntime to run on the CPU" in " ".join(r.output.split()), r.output
