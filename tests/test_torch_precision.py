"""The PyTorch runner's fast paths on the CPU, each against the float32 eager reference.

Half-precision networks (`StageEngine`, ``precision``), the affine map folded
into the decoder's first convolution (``fuse_affine``), the WCT fit on the
features' device (`runtime.device_fit`), and the precision option's errors
on a machine without CUDA. ``torch.compile`` is in tests/test_torch_compile.py;
the same paths on a GPU in tests/test_gpu.py.

Tolerances (measured here, CD 16x, 96 px content, 5 stages, WCT alpha 0.6):
fp16 max 0.044, mean 0.0014; bf16 max 0.28, mean 0.011 (in [0, 1]); one
decoder with the map folded, float32: max 6e-7.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultrastyle.core.arch import Layer
from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.styles import Target
from ultrastyle.core.transforms import FeatureStats, sym_power
from ultrastyle.errors import RunnerError
from ultrastyle.io.images import resize_long_side
from ultrastyle.models.networks import reflect_pad
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.backends.torch_engine import FoldedDecoder, StageEngine, fold_affine, network_dtype
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.device_fit import DeviceFitter, fit_on_device, sym_power_masked
from ultrastyle.runtime.tiled import stylize_tiled

# Per dtype, on [0, 1] outputs of the 5-stage cascade: (max abs, mean abs) against float32.
CASCADE_TOL = {"fp16": (0.1, 0.005), "bf16": (0.6, 0.03)}
# Per dtype, one stage's encoder features: max abs error over the features' largest magnitude.
FEATURE_TOL = {"fp16": 5e-3, "bf16": 4e-2}


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def small(photo, style):
    return resize_long_side(photo, 96), resize_long_side(style, 96)


@pytest.fixture(scope="module")
def reference(cd16x, small):
    content, style_img = small
    return stylize(cd16x, content, style_statistics(cd16x, style_img, DEFAULT_LEVELS)).clamp(0, 1)


def _errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = (y.clamp(0, 1) - ref).abs()
    return d.max().item(), d.mean().item()


# -- half precision ---------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_networks_match_the_float32_features_per_stage(cd16x, precision):
    engine = StageEngine(cd16x, precision)
    gen = torch.Generator().manual_seed(0)
    for stage in (1, 3, 5):
        g = cd16x.arch.grid(stage)
        x = torch.rand(1, 3, 4 * g, 3 * g, generator=gen)
        ref, f = cd16x.encode(stage, x), engine.encode(stage, x)
        assert f.dtype == torch.float32 and f.shape == ref.shape
        rel = ((f - ref).abs().max() / ref.abs().max()).item()
        print(f"{precision} stage {stage}: features max error {rel:.2e} of their largest value")
        assert rel <= FEATURE_TOL[precision], stage
    # The float32 model is the reference and is left as it was: the engine works on copies.
    assert next(cd16x.decoders[5].parameters()).dtype == torch.float32
    assert next(engine.decoders[5].parameters()).dtype == network_dtype(precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_cascade_matches_the_float32_reference(cd16x, small, reference, precision):
    content, style_img = small
    engine = StageEngine(cd16x, precision)
    y = stylize(engine, content, style_statistics(engine, style_img, DEFAULT_LEVELS))
    mx, mean = _errors(y, reference)
    print(f"{precision} cascade vs float32: max {mx:.3g}, mean {mean:.3g}")
    assert 0 < mx <= CASCADE_TOL[precision][0] and mean <= CASCADE_TOL[precision][1]


def test_bf16_runner_tiled_matches_the_float32_reference(cd16x, small, reference):
    # The runner's tiled calls (encode_core / decode_core / stylize_core) in bfloat16, against the float32 whole image.
    content, style_img = small
    with TorchRunner(cd16x, precision="bf16") as r:
        assert r.engine is not None and r.engine.dtype == torch.bfloat16
        stats = style_statistics(r, style_img, DEFAULT_LEVELS)
        with canvas_from_array(content.numpy(), layout="chw") as cv:
            out = stylize_tiled(r, cv, stats, TilingOptions(tile=32), method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
            try:
                tiled = torch.from_numpy(out.numpy().copy())
            finally:
                out.close()
    mx, mean = _errors(tiled, reference)
    print(f"bf16 tiled (32 px) vs float32 whole: max {mx:.3g}, mean {mean:.3g}")
    assert 0 < mx <= CASCADE_TOL["bf16"][0] and mean <= CASCADE_TOL["bf16"][1]


def test_precision_errors_without_cuda(cd16x):
    with pytest.raises(RunnerError, match=r"precision='fp8'.*fp32, fp16, bf16"):
        TorchRunner(cd16x, precision="fp8")
    with pytest.raises(RunnerError, match=r"precision='fp8'"):
        StageEngine(cd16x, "fp8")
    if cd16x.device.type != "cuda":
        # PyTorch runs float16 convolutions on the CPU, but 80x slower than float32 here: refused with the way out.
        with pytest.raises(RunnerError, match=r"precision='fp16'.*CUDA.*precision='fp32' there"):
            TorchRunner(cd16x, precision="fp16")
    with TorchRunner(cd16x, precision="bf16") as r:  # bf16 runs on the CPU
        assert r.encode(1, torch.rand(1, 3, 8, 8)).dtype == torch.float32


def test_open_runner_routes_precision_and_compile(cd16x_dir):
    from ultrastyle.runtime.backends.select import open_runner

    r = open_runner(cd16x_dir, backend="auto", precision="bf16", stages=(1,), progress=False)
    assert isinstance(r, TorchRunner) and r.precision == "bf16"  # only PyTorch runs bfloat16
    r = open_runner(cd16x_dir, backend="auto", compile=True, stages=(1,), progress=False)
    assert isinstance(r, TorchRunner) and r.compile and r.traits.uniform_tiles  # compiled: one tile shape per pass
    with pytest.raises(RunnerError, match=r"bf16 does not run on the onnxruntime backend, which runs fp32, int8; "):
        open_runner(cd16x_dir, backend="onnxruntime", precision="bf16", stages=(1,), progress=False)
    with pytest.raises(RunnerError, match=r"fp16 does not run on the onnxruntime backend \(picked by backend='auto' on cpu\), which"):
        open_runner(cd16x_dir, backend="auto", precision="fp16", stages=(1,), progress=False)  # the user chose no backend
    with pytest.raises(RunnerError, match=r"compile=True runs the torch backend"):
        open_runner(cd16x_dir, backend="onnxruntime", compile=True, stages=(1,), progress=False)
    with pytest.raises(RunnerError, match="precision='fp16'"):
        open_runner(cd16x_dir, backend="torch", device="cpu", precision="fp16", stages=(1,), progress=False)


# -- the affine map folded into the decoder's first convolution --------------------------------


def test_fold_affine_is_the_convolution_of_the_mapped_features():
    gen = torch.Generator().manual_seed(1)
    c, o = 6, 5
    f = torch.randn(2, c, 9, 7, generator=gen, dtype=torch.float64)
    w, bias = torch.randn(o, c, 3, 3, generator=gen, dtype=torch.float64), torch.randn(o, generator=gen, dtype=torch.float64)
    a, b = torch.randn(c, c, generator=gen, dtype=torch.float64), torch.randn(c, generator=gen, dtype=torch.float64)
    mapped = torch.einsum("ij,njhw->nihw", a, f) + b.view(1, c, 1, 1)
    ref = F.conv2d(reflect_pad(mapped, 1), w, bias)
    w2, b2 = fold_affine(w, bias, a, b)
    torch.testing.assert_close(F.conv2d(reflect_pad(f, 1), w2, b2), ref, rtol=1e-12, atol=1e-12)
    # With zero padding it would not be exact: the border sees b through the weights of padded taps.
    zero = F.conv2d(F.pad(f, (1, 1, 1, 1)), w2, b2)
    assert not torch.allclose(zero, F.conv2d(F.pad(mapped, (1, 1, 1, 1)), w, bias))


@pytest.mark.parametrize("stage", [1, 3, 5])
def test_folded_decoder_matches_the_unfused_float32_one(cd16x, stage):
    gen = torch.Generator().manual_seed(stage)
    c = cd16x.arch.feature_channels(stage)
    f = torch.rand(1, c, 12, 10, generator=gen) * 2
    a = torch.eye(c, dtype=torch.float64) * 0.7 + torch.randn(c, c, generator=gen, dtype=torch.float64) * 0.05
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    fused = StageEngine(cd16x, "fp32", fuse_affine=True)
    ref, y = cd16x.decode(stage, f, a, b), fused.decode(stage, f, a, b)
    d = (y - ref).abs().max().item()
    print(f"stage {stage}: folded vs unfused decoder max {d:.2e}")
    assert d <= 1e-4
    # Cut-out cores and the fold cache: one fold per (A, b) pair, refolded for a new pair.
    core = fused.decode_core(stage, f, a, b, slice(2, 8), slice(1, 9))
    assert torch.equal(core, y[..., 2:8, 1:9])
    w0 = fused._fold(stage, a, b)[0]
    assert fused._fold(stage, a, b)[0] is w0 and fused._fold(stage, a * 1, b)[0] is not w0


def test_fused_runner_tiled_equals_the_whole_image_reference(cd16x, small, reference):
    # The compiled runner's tile calls (whole tile graphs, the core cut out after; the map folded), run eagerly.
    content, style_img = small
    with TorchRunner(cd16x, fuse_affine=True) as r:
        assert r.engine is not None and r.engine.fuse_affine and not r.engine.compiled
        stats = style_statistics(r, style_img, DEFAULT_LEVELS)
        with canvas_from_array(content.numpy(), layout="chw") as cv:
            out = stylize_tiled(r, cv, stats, TilingOptions(tile=32), method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
            try:
                tiled = torch.from_numpy(out.numpy().copy()).clamp(0, 1)
            finally:
                out.close()
    d = (tiled - reference).abs().max().item()
    print(f"fused fp32 tiled (32 px) vs the whole-image reference: max {d:.2e}")
    assert d <= 1e-4


def test_folding_refuses_a_decoder_that_does_not_start_with_a_convolution(cd16x):
    dec = cd16x.decoders[2]
    saved = dec.layers
    try:
        dec.layers = [Layer("up"), *saved]
        with pytest.raises(ValueError, match="not a convolution"):
            FoldedDecoder(dec)
    finally:
        dec.layers = saved


# -- the WCT fit on the features' device --------------------------------------------------------


def _stats(channels: int, seed: int, rank: int | None = None) -> FeatureStats:
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(channels, rank or channels, generator=gen, dtype=torch.float64)
    f = (basis @ torch.randn(rank or channels, 400, generator=gen, dtype=torch.float64)).float().view(1, channels, 20, 20)
    return FeatureStats.of(f.abs() + 0.1)


def test_masked_symmetric_power_equals_the_dropping_one():
    for rank in (None, 3):  # full rank, and eigenvalues below the floor (dropped / masked)
        cov = _stats(8, 2, rank).covariance()
        for power in (0.5, -0.5):
            torch.testing.assert_close(sym_power_masked(cov, power), sym_power(cov, power), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_device_fit_equals_the_host_fit(method):
    content = _stats(8, 3)
    styles = ({2: _stats(8, 4)}, {2: _stats(8, 5, rank=4)})
    target = Target(styles, (0.3, 0.7))
    fitter = DeviceFitter()
    for alpha in (0.0, 0.6, 1.0):
        a, b = fitter.fit(target, method, 2, content, alpha, torch.device("cpu"))
        ra, rb = target.fit(method, 2, content, alpha)
        torch.testing.assert_close(a, ra, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, rb, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="alpha"):
        fitter.fit(target, method, 2, content, 1.5, torch.device("cpu"))
    with pytest.raises(ValueError, match="channels"):
        fitter.fit(Target(({2: _stats(6, 6)},)), method, 2, content, 0.5, torch.device("cpu"))


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_device_fit_refuses_features_that_are_not_finite_as_the_host_fit_does(method):
    good = _stats(8, 3)
    bad = FeatureStats(good.count, good.sum.clone(), good.outer.clone())
    bad.outer[1, 2] = float("inf")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="the content image's features are not finite"):
        DeviceFitter().fit(Target(({2: good},)), method, 2, bad, 0.6, cpu)  # WCT gave eigh's LAPACK error
    with pytest.raises(ValueError, match="the style image's features are not finite"):
        DeviceFitter().fit(Target(({2: bad},)), method, 2, good, 0.6, cpu)


def test_device_fitter_keeps_each_styles_colouring_matrix():
    fitter = DeviceFitter(cache_size=2)
    s1, s2, s3 = _stats(8, 7), _stats(8, 8), _stats(8, 9)
    cpu = torch.device("cpu")
    first = fitter.style_colour(s1, cpu)[0]
    assert fitter.style_colour(s1, cpu)[0] is first  # reused
    fitter.style_colour(s2, cpu)
    fitter.style_colour(s3, cpu)  # evicts s1, the least recently used
    assert fitter.style_colour(s1, cpu)[0] is not first
    torch.testing.assert_close(first, sym_power(s1.covariance(), 0.5), rtol=1e-10, atol=1e-10)


def test_cascade_fitted_on_the_device_equals_the_host_fit(cd16x, small, reference):
    content, style_img = small
    stats = style_statistics(cd16x, style_img, DEFAULT_LEVELS)
    on_device = stylize(cd16x, content, stats, fit_on="device").clamp(0, 1)  # the CUDA code path, run on the CPU
    assert (on_device - reference).abs().max().item() <= 1e-6
    assert fit_on_device("auto", torch.device("cuda")) and not fit_on_device("auto", torch.device("cpu"))
    with pytest.raises(ValueError, match="fit_on"):
        stylize(cd16x, content, stats, fit_on="gpu")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bfloat16_warns_that_it_is_slow(cd16x, monkeypatch, native):
    """Measured 20x slower than float32 on an AVX2 CPU (docs/gpu.md); the fp16 refusal used to suggest it as the fix."""
    import warnings

    from ultrastyle.runtime.backends import torch_backend

    monkeypatch.setattr(torch_backend, "native_cpu_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        TorchRunner(cd16x, precision="bf16")
        TorchRunner(cd16x)  # float32: nothing to say
    slow = [w for w in seen if issubclass(w.category, torch_backend.SlowPrecisionWarning)]
    assert len(slow) == (0 if native else 1), [str(w.message) for w in seen]
    if not native:
        assert "about 20x slower than float32" in str(slow[0].message) and slow[0].message.remedy[-1].value == "fp32"
        assert slow[0].filename == __file__  # said at the caller's line, not the library's
    with pytest.raises(RunnerError, match=r"use precision='fp32' there \(or 'bf16' on a CPU with native bfloat16\)"):
        TorchRunner(cd16x, precision="fp16")
