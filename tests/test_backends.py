"""One conformance suite for every runner, against the PyTorch reference."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.export.bundle import BundleError, export_bundle
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.options import OptionError
from ultrastyle.runtime.backends.base import Runner, RunnerError
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
from ultrastyle.runtime.backends.select import ensure_bundle, open_runner, resolve_backend
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.memory import release_free_memory
from ultrastyle.runtime.tiled import stylize_tiled

# Max abs difference from the PyTorch reference per output, float32.
TOL = {"features": 3e-4, "image": 1e-4}


@dataclass(frozen=True)
class Tolerance:
    """Max abs differences from the PyTorch reference: features (times max(1, |reference|) when relative), images, tiled images."""

    features: float
    image: float
    tiled: float
    relative: bool = False

    def features_bound(self, ref: torch.Tensor) -> float:
        return self.features * (max(1.0, ref.abs().max().item()) if self.relative else 1.0)


FLOAT32 = Tolerance(TOL["features"], TOL["image"], 1e-4)
# IEEE float32 on a GPU (TensorRT's fp32 engines, TF32 off): another device's float32 kernels. The PyTorch runner
# on an H100 measured <= 1e-4 per network (features relative to their scale) and 6.9e-5 on the cascade (test_gpu.py).
GPU_FLOAT32 = Tolerance(3e-4, 2e-4, 2e-4, relative=True)
# TF32 (TensorRT's default, opt-in here: build_engines(tf32=True)): Conv/MatMul inputs keep 10 mantissa bits.
# Under the stand-in's emulation of it (tests/test_trt_fakes.py), CD 16x measured at most 1.2e-3 (features,
# relative), 5.8e-3 (images, stage 5) and 2.3e-2 (the 5-stage tiled cascade); these are 2.5x that.
TF32 = Tolerance(3e-3, 1.5e-2, 6e-2, relative=True)


@pytest.fixture
def tol() -> Tolerance:
    """The tolerance of this module's runners (test_trt_runner.py overrides it for a GPU's TensorRT engines)."""
    return FLOAT32


def _rss() -> int:
    """This process's resident set (VmRSS), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024


@pytest.fixture(scope="module")
def model(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return export_bundle(model, tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture(params=["torch", "onnxruntime"])
def runner(request, model, bundle) -> Runner:
    return TorchRunner(model) if request.param == "torch" else OnnxRuntimeRunner(bundle, threads=2)


def test_runner_refuses_infer_before_activate_and_double_activate(runner):
    with pytest.raises(RunnerError, match="activate"):
        runner.encode(1, torch.rand(1, 3, 8, 8))
    runner.activate()
    with pytest.raises(RunnerError, match="already active"):
        runner.activate()
    runner.deactivate()
    with pytest.raises(RunnerError, match="not active"):
        runner.deactivate()


def test_runner_is_a_context_manager(runner):
    with runner as r:
        assert r.is_active
    assert not runner.is_active


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_runner_matches_torch_reference_on_every_stage_network(runner, model, stage, tol):
    g = model.arch.grid(stage)
    gen = torch.Generator().manual_seed(stage)
    x = torch.rand(1, 3, 5 * g, 3 * g, generator=gen)
    c = model.arch.feature_channels(stage)
    a = torch.eye(c, dtype=torch.float64) * 0.7 + torch.randn(c, c, generator=gen, dtype=torch.float64) * 0.02
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    with runner:
        f = runner.encode(stage, x)
        y = runner.decode(stage, f, a, b)
        plain = runner.infer(f"decoder{stage}", {"features": f})["image"]
    ref_f = model.encode(stage, x)
    assert f.shape == ref_f.shape == (1, c, 5, 3)
    assert (f - ref_f).abs().max() <= tol.features_bound(ref_f)
    assert y.shape == plain.shape == x.shape
    assert (y - model.decode(stage, ref_f, a, b)).abs().max() <= tol.image
    assert (plain - model.decoders[stage](ref_f)).abs().max() <= tol.image


def test_runner_rejects_unknown_networks(runner):
    with runner, pytest.raises(RunnerError, match="unknown network"):
        runner.infer("classifier1", {})


def test_tiled_stylization_on_runner_matches_torch_whole_image_within_1e4(runner, model, shared_dir, tol):
    content = resize_long_side(load_image(shared_dir / "images/content/cd_content_in1.jpg"), 200)
    style = resize_long_side(load_image(shared_dir / "images/style/cd_style_in4.jpg"), 128)
    ref = stylize(model, content, style_statistics(model, style, DEFAULT_LEVELS))
    with runner:
        stats = style_statistics(runner, style, DEFAULT_LEVELS)
        with canvas_from_array(content.numpy(), layout="chw") as cv:
            out = stylize_tiled(runner, cv, stats, TilingOptions(tile=64), method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
            got = torch.from_numpy(out.numpy().copy())
            out.close()
    assert (got.clamp(0, 1) - ref.clamp(0, 1)).abs().max() <= tol.tiled  # 1e-4 in float32


def test_onnxruntime_arena_does_not_grow_across_tile_sizes(bundle):
    # Tiles of changing sizes, repeated: memory after the second round must not exceed the first's.
    sizes = [(512, 384), (128, 640), (640, 128), (256, 256), (496, 512)]
    with OnnxRuntimeRunner(bundle, threads=2) as r:
        highs = []
        for _ in range(3):
            for h, w in sizes:
                f = r.encode(3, torch.rand(1, 3, h, w))
                r.decode(3, f, torch.eye(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))
            highs.append(_rss())
    assert highs[2] <= highs[0] + 64 * 2**20, [h >> 20 for h in highs]


def test_onnxruntime_runner_overlaps_tile_io_only_with_a_gpu_provider(bundle):
    # Traits only: with the CUDA provider first, a GPU computes while the host reads and writes tiles (runtime/tile_io.py).
    r = OnnxRuntimeRunner(bundle, threads=2)
    assert r.traits.overlap_io is False and r.traits.budget_memory == "host"
    r.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert r.traits.overlap_io is True and r.traits.budget_memory == "device"


def test_onnxruntime_runner_decodes_stage_1_with_the_folded_decoder(bundle, monkeypatch):
    c = bundle.arch.feature_channels(1)
    f = torch.rand(1, c, 8, 8) * 2
    a, b = torch.eye(c, dtype=torch.float64) * 0.8, torch.full((c,), 0.1, dtype=torch.float64)
    with OnnxRuntimeRunner(bundle, threads=2) as r:
        ran: list[str] = []
        infer = r.infer

        def spy(network, feed):
            ran.append(network)
            return infer(network, feed)

        monkeypatch.setattr(r, "infer", spy)
        y = r.decode(1, f, a, b)
        r.decode(2, torch.rand(1, bundle.arch.feature_channels(2), 4, 4), torch.eye(32, dtype=torch.float64), torch.zeros(32, dtype=torch.float64))
        # folding does not pay off beyond stage 1 (FOLDED_STAGES)
        assert ran == ["decoder_folded1", "decoder_affine2"]
        ref = infer("decoder_affine1", {"features": f, "A": a, "b": b})["image"]
    assert (y - ref).abs().max() <= TOL["image"]


def test_onnxruntime_release_memory_hands_arena_chunks_back(bundle):
    # Without it the shared arena holds every pass's peak; the tiled pipeline calls it between passes.
    with OnnxRuntimeRunner(bundle, threads=2) as r:
        r.release_memory()
        release_free_memory()  # earlier tests' freed heap pages: gone, so the run below must fault its own in
        before = _rss()
        r.encode(4, torch.rand(1, 3, 1024, 1024))
        grown = _rss() - before
        r.release_memory(keep_bytes=2**40)  # within what the caller lets it keep: no shrink, no refaulting
        kept = _rss() - before
        r.release_memory()
        release_free_memory()  # as the tiled pipeline does after a pass
        released = _rss() - before
    assert grown > 64 * 2**20, grown >> 20  # the run really held arena memory
    assert kept > grown * 0.9, (grown >> 20, kept >> 20)
    assert released < grown / 3, (grown >> 20, released >> 20)


def test_closing_an_onnxruntime_runner_hands_the_arena_back(bundle):
    """The arena is the process's, not the sessions': a long-lived service that closed its Stylizer kept the peak
    (leak review: 597 MB after close, 300 MB at open)."""
    r = OnnxRuntimeRunner(bundle, threads=2)
    with r:
        r.release_memory()
        release_free_memory()
        before = _rss()
        r.encode(4, torch.rand(1, 3, 1024, 1024))
        grown = _rss() - before
    release_free_memory()
    closed = _rss() - before
    assert grown > 64 * 2**20, grown >> 20
    assert closed < grown / 3, (grown >> 20, closed >> 20)


def test_onnxruntime_release_memory_counts_growth_from_its_first_call(bundle):
    # Shrinking at the first call made every stage of a small image fault its arena in again.
    with OnnxRuntimeRunner(bundle, threads=2) as r:
        r.encode(4, torch.rand(1, 3, 512, 512))
        before = _rss()
        r.release_memory(keep_bytes=1)  # the first call takes the reference: nothing handed back
        kept = _rss()
        r.encode(4, torch.rand(1, 3, 1024, 1024))  # a larger tile: the arena grows past keep_bytes
        grown = _rss()
        r.release_memory(keep_bytes=1)
        release_free_memory()
        released = _rss()
    assert kept > before - 8 * 2**20, (before >> 20, kept >> 20)
    assert grown - kept > 64 * 2**20, (kept >> 20, grown >> 20)
    assert released < grown - 64 * 2**20, (grown >> 20, released >> 20)


def test_onnxruntime_sessions_do_not_spin_unless_asked(bundle):
    # Spinning pool threads take the cores from the pipeline's own work between runs.
    with OnnxRuntimeRunner(bundle, threads=2) as r:
        options = r.session("encoder1").get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with OnnxRuntimeRunner(bundle, threads=2, spinning=True) as r:
        options = r.session("encoder1").get_session_options()
        with pytest.raises(Exception, match="allow_spinning"):  # not set: ORT's default (spinning) applies
            options.get_session_config_entry("session.intra_op.allow_spinning")


def test_auto_backend_is_onnxruntime_on_cpu_and_tensorrt_says_what_is_missing():
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    if not torch.cuda.is_available():  # no onnxruntime-gpu here: PyTorch takes the GPU request
        assert resolve_backend("auto", "cuda") == "torch"
        with pytest.raises(RunnerError, match="onnxruntime-gpu"):
            open_runner("cd-wct-16x", backend="onnxruntime", device="cuda")
    from ultrastyle.trt.env import missing_for_tensorrt

    if missing_for_tensorrt():  # one message naming each missing piece, before any export
        with pytest.raises(RunnerError, match="the TensorRT backend needs"):
            open_runner("cd-wct-16x", backend="tensorrt")
    with pytest.raises(OptionError, match="backend: expected one of auto, torch, onnxruntime, tensorrt, got 'tflite'"):
        resolve_backend("tflite", "cpu")


def test_torch_backend_refuses_a_bundle(bundle):
    with pytest.raises(RunnerError, match="bundle of ONNX graphs"):
        open_runner(bundle.path, backend="torch")


def test_bundle_is_exported_on_first_use_and_reused(cd16x_dir, tmp_path):
    first = ensure_bundle(cd16x_dir, stages=(1, 2))
    mtime = (first.path / "manifest.json").stat().st_mtime_ns
    again = ensure_bundle(cd16x_dir, stages=(1, 2))
    assert again.path == first.path and (again.path / "manifest.json").stat().st_mtime_ns == mtime
    # A cached bundle from an older ultrastyle without some graph kind is exported again.
    manifest = json.loads((first.path / "manifest.json").read_text())
    del manifest["networks"]["decoder_folded1"]
    (first.path / "manifest.json").write_text(json.dumps(manifest))
    renewed = ensure_bundle(cd16x_dir, stages=(1, 2))
    assert renewed.path == first.path and "decoder_folded1" in renewed.manifest["networks"]
    # Other weights (one file changed) get their own bundle.
    other = tmp_path / "w"
    other.mkdir()
    for k in (1, 2):
        for s in ("SE", "SD"):
            (other / f"{k}{s}.pth").write_bytes((cd16x_dir / f"{k}{s}.pth").read_bytes())
    sd = torch.load(other / "1SD.pth", map_location="cpu", weights_only=True)
    sd["model"]["conv11.bias"] += 0.5
    torch.save(sd, other / "1SD.pth")
    changed = ensure_bundle(other, stages=(1, 2))
    assert changed.path != first.path
    assert changed.manifest["source_weights"]["1SD.pth"] != first.manifest["source_weights"]["1SD.pth"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_bundle_cache_is_a_bundle_error_naming_it(cd16x_dir, monkeypatch, code):
    # A read-only mount raises a plain OSError (EROFS), not PermissionError; as root no mode can stage either, so the
    # export is made to fail as the file system would.
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), "bundles")

    monkeypatch.setattr("ultrastyle.runtime.backends.select.export_bundle", refuse)
    with pytest.raises(BundleError, match=r"cannot write the bundle cache .*bundles.*PyTorch backend") as info:
        ensure_bundle(cd16x_dir, stages=(1,))
    assert os.strerror(code) in str(info.value)


def test_other_export_failures_are_not_called_a_read_only_cache(cd16x_dir, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ultrastyle.runtime.backends.select.export_bundle", full)
    with pytest.raises(OSError, match="No space left") as info:
        ensure_bundle(cd16x_dir, stages=(1,))
    assert not isinstance(info.value, BundleError)


def test_a_subset_of_stages_runs_from_the_whole_models_bundle(cd16x_dir, tmp_path):
    two = tmp_path / "two"  # a model of two stages: its whole bundle is cheap to export
    two.mkdir()
    for k in (1, 2):
        for s in ("SE", "SD"):
            (two / f"{k}{s}.pth").write_bytes((cd16x_dir / f"{k}{s}.pth").read_bytes())
    exports = []
    whole = ensure_bundle(two, on_export=exports.append)
    subset = ensure_bundle(two, stages=(2,), on_export=exports.append)
    assert subset.path == whole.path and len(exports) == 1  # no second export for --levels 2
    with open_runner(two, backend="onnxruntime", stages=(2,)) as r:
        assert 2 in r.stages


def test_cli_onnxruntime_backend_matches_torch_backend(shared_dir, cd16x_dir, tmp_path):
    with Image.open(shared_dir / "images/content/cd_content_in4.jpg") as im:
        im.convert("RGB").resize((131, 90), Image.Resampling.LANCZOS).save(tmp_path / "c.png")
    outs = {}
    for backend in ("torch", "onnxruntime"):
        r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), str(shared_dir / "images/style/cd_style_in3.jpg"),
                                     "--model", str(cd16x_dir), "--style-size", "96", "--tile", "48",
                                     "--backend", backend, "-o", str(tmp_path / backend)])  # fmt: skip
        assert r.exit_code == 0, r.output
        outs[backend] = np.asarray(Image.open(tmp_path / backend / "c_stylized_cd_style_in3.png"), np.int16)
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= 1


def test_cuda_n_reaches_the_onnxruntime_cuda_provider_and_the_command_line(bundle, monkeypatch, tmp_path):
    import ultrastyle.runtime.backends.onnxruntime_backend as ort_backend
    import ultrastyle.runtime.backends.select as select

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_backend, "providers_for", lambda device: cuda if device.startswith("cuda") else ["CPUExecutionProvider"])
    made = {}
    monkeypatch.setattr(ort_backend, "OnnxRuntimeRunner", lambda bundle, **kw: made.update(kw) or "runner")
    assert select.open_runner(bundle.path, backend="onnxruntime", device="CUDA:1") == "runner"
    assert made["providers"] == cuda and made["device_id"] == 1  # the GPU asked for, not the provider's first
    runner = OnnxRuntimeRunner(bundle, providers=cuda, device_id=1)
    runner.activate_impl()  # session options only: no session is made
    assert runner._provider_options == [{"arena_extend_strategy": "kSameAsRequested", "device_id": "1"}, {}]
    monkeypatch.undo()
    r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), "-s", str(tmp_path / "s.png"), "--device", "gpu"])
    assert r.exit_code == 2 and "expected cpu, cuda or cuda:N, got 'gpu'" in " ".join(r.output.split()), r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), "-s", str(tmp_path / "s.png"), "--device", "cuda:1"])
        assert r.exit_code == 2 and "--device cuda:1: no CUDA device is available to PyTorch here" in r.output, r.output
    with pytest.raises(OptionError, match="expected cpu or cuda on a Ray pool"):
        import ultrastyle

        ultrastyle.api.ClusterStylizer("cd-wct-16x", address="127.0.0.1:1", device="cuda:1")


def test_tensorrt_refuses_a_gpu_other_than_the_first_visible_before_anything_loads():
    with pytest.raises(RunnerError, match="runs on the first visible GPU, not cuda:2; choose the GPU with CUDA_VISIBLE_DEVICES=2"):
        open_runner("cd-wct-16x", backend="tensorrt", device="cuda:2")


def test_auto_does_not_pick_tensorrt_for_a_gpu_it_cannot_run_on(monkeypatch):
    import ultrastyle.runtime.backends.select as select

    monkeypatch.setattr(select, "tensorrt_engines_ready", lambda *a, **k: True)  # engines built (`ultrastyle build MODEL`)
    assert select.resolve_backend("auto", "cuda:0", "cd-wct-16x") == "tensorrt"
    assert select.resolve_backend("auto", "cuda:1", "cd-wct-16x") != "tensorrt"  # then refused by open_runner: a dead end


def test_a_cached_bundle_exported_again_says_the_int8_graphs_it_loses(cd16x_dir):
    import json

    from ultrastyle.models import zoo

    zoo.import_local("cd-wct-16x", cd16x_dir)
    b = ensure_bundle("cd-wct-16x", stages=(5,))
    manifest = json.loads((b.path / "manifest.json").read_text())
    del manifest["networks"]["decoder_folded5"]  # as an older release's bundle: a graph kind short, so exported again
    (b.path / "decoder_folded5.onnx").unlink()
    (b.path / "manifest.json").write_text(json.dumps(manifest))
    (b.path / "encoder5.int8.onnx").write_bytes((b.path / "encoder5.onnx").read_bytes())
    said: list[str] = []
    again = ensure_bundle("cd-wct-16x", stages=(5,), on_export=said.append)
    assert again.path == b.path and not (b.path / "encoder5.int8.onnx").exists()
    assert said and "the 1 int8 graph it holds are deleted (calibrate and build again)" in said[0], said  # "first use" before


def test_a_damaged_cached_bundle_is_removed_only_under_its_lock_and_only_if_still_damaged(cd16x_dir):
    """A first-use run removed a damaged cached bundle unlocked: the one another run had just exported in its place too."""
    import ultrastyle.runtime.backends.select as select
    from ultrastyle.export.bundle import BundleBusy, bundle_in_use
    from ultrastyle.models import zoo

    zoo.import_local("cd-wct-16x", cd16x_dir)
    b = ensure_bundle("cd-wct-16x", stages=(5,))
    inode = os.stat(b.path).st_ino
    real = select._cache_repair
    with pytest.MonkeyPatch.context() as mp:  # found damaged, then repaired by another run before this one takes the lock
        mp.setattr(select, "_find_bundle", lambda *a: None)
        mp.setattr(select, "_cache_repair", lambda name, files: (real(name, files)[0], "a graph's sha256 differs", ""))
        mp.setattr(select, "export_bundle", lambda *a, **k: pytest.fail("exported again over a sound bundle"))
        assert ensure_bundle("cd-wct-16x", stages=(5,)).path == b.path and os.stat(b.path).st_ino == inode  # kept
    (b.path / "encoder5.onnx").write_bytes(b"damaged")
    with bundle_in_use(b.path):  # another process calibrating or exporting it
        with pytest.raises(BundleBusy, match="another process is calibrating or exporting this bundle"):
            ensure_bundle("cd-wct-16x", stages=(5,))
    assert (b.path / "encoder5.onnx").read_bytes() == b"damaged"  # left to the process holding it
    again = ensure_bundle("cd-wct-16x", stages=(5,))
    assert again.path == b.path and (b.path / "encoder5.onnx").read_bytes() != b"damaged"
