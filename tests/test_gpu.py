"""On a CUDA device: the device-memory bindings the TensorRT runner uses, and the PyTorch runner on the GPU.

Every test here is marked ``gpu`` and skips, saying what is missing, without
a CUDA device (or without cuda-python / pycuda for the device-memory tests).
Run them with ``python -m pytest -q -m gpu``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ultrastyle.core.canvas import Canvas, canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.tiled import plan_image_for, style_statistics_tiled, stylize_tiled
from ultrastyle.trt.device_memory import ALIGNMENT, DeviceMemory, GrowingBuffer, GrowingPinned, open_device_memory
from ultrastyle.trt.env import TensorRTUnavailable

pytestmark = pytest.mark.gpu

MiB = 2**20


# -- device memory (cuda-python, pycuda) ---------------------------------------------------


@pytest.fixture(params=["cuda-python", "pycuda"])
def mem(request) -> DeviceMemory:
    try:
        m = open_device_memory(request.param)
    except TensorRTUnavailable as exc:
        pytest.skip(str(exc))
    except Exception as exc:
        if not type(exc).__module__.startswith("pycuda"):  # a bug of ours fails here, and is not skipped
            raise
        pytest.skip(f"pycuda is installed but finds no usable CUDA device or driver: {exc}")
    yield m
    m.close()


def _pattern(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_alloc_is_aligned_and_free_gives_it_back(mem):
    n = 256 * MiB
    free0, total = mem.mem_info()
    assert 0 < free0 <= total
    buf = mem.alloc(n)
    try:
        assert buf.ptr % ALIGNMENT == 0 and buf.nbytes == n
        free1, _ = mem.mem_info()
        assert free0 - free1 >= n - 2 * MiB  # the driver's granularity aside, the bytes are taken
    finally:
        mem.free(buf)
    free2, _ = mem.mem_info()
    assert free2 >= free1 + n - 2 * MiB
    tiny = mem.alloc(0)  # zero bytes still gives a valid (aligned) allocation
    assert tiny.ptr % ALIGNMENT == 0
    mem.free(tiny)


def test_host_device_host_round_trip_is_exact(mem):
    n = 8 * MiB + 13  # odd size: no multiple-of-anything assumption
    src, dst = mem.alloc_pinned(n), mem.alloc_pinned(n)
    dev = mem.alloc(n)
    stream = mem.create_stream()
    try:
        src.array[:] = _pattern(n)
        dst.array[:] = 0
        mem.copy_htod(dev.ptr, src, n, stream)
        mem.copy_dtoh(dst, dev.ptr, n, stream)
        mem.synchronize(stream)
        assert np.array_equal(src.array[:n], dst.array[:n])
        # float32 views of the pinned buffers (how the runner stages tiles)
        x = src.view(np.float32, (2, 3, 5))
        x[:] = np.arange(30, dtype=np.float32).reshape(2, 3, 5)
        mem.copy_htod(dev.ptr, src, x.nbytes, stream)
        mem.copy_dtoh(dst, dev.ptr, x.nbytes, stream)
        mem.synchronize(stream)
        assert np.array_equal(dst.view(np.float32, (2, 3, 5)), x)
    finally:
        mem.destroy_stream(stream)
        mem.free(dev)
        mem.free_pinned(src)
        mem.free_pinned(dst)


def test_growing_buffer_grows_keeps_its_address_when_large_enough_and_releases(mem):
    grow = GrowingBuffer(mem)
    pinned = GrowingPinned(mem)
    stream = mem.create_stream()
    try:
        assert grow.ensure(1 * MiB) and grow.nbytes >= 1 * MiB
        ptr = grow.ptr
        assert not grow.ensure(512 * 1024) and grow.ptr == ptr  # smaller: kept
        assert grow.ensure(64 * MiB) and grow.nbytes >= 64 * MiB  # larger: moved
        n = 64 * MiB
        host = pinned.ensure(n)
        assert host.nbytes >= n and pinned.ensure(n // 2) is host
        host.array[:n] = _pattern(n, seed=1)
        back = mem.alloc_pinned(n)
        try:
            mem.copy_htod(grow.ptr, host, n, stream)  # the whole grown buffer is usable
            mem.copy_dtoh(back, grow.ptr, n, stream)
            mem.synchronize(stream)
            assert np.array_equal(back.array[:n], host.array[:n])
        finally:
            mem.free_pinned(back)
        free_before, _ = mem.mem_info()
        grow.release()
        free_after, _ = mem.mem_info()
        assert grow.nbytes == 0 and free_after >= free_before + 64 * MiB - 2 * MiB
    finally:
        grow.release()
        pinned.release()
        mem.destroy_stream(stream)


def test_device_memory_shares_pytorchs_context(mem):
    # TensorRT's runtime-API calls, the binding's pointers and PyTorch's tensors must all live in
    # the device's primary context: copy into and out of a PyTorch CUDA tensor by its address.
    if not torch.cuda.is_available():
        pytest.skip("PyTorch here has no CUDA")
    t = torch.arange(1024, dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    host = mem.alloc_pinned(t.numel() * 4)
    stream = mem.create_stream()
    try:
        mem.copy_dtoh(host, t.data_ptr(), t.numel() * 4, stream)
        mem.synchronize(stream)
        assert np.array_equal(host.view(np.float32, (1024,)), np.arange(1024, dtype=np.float32))
        host.view(np.float32, (1024,))[:] = -1.5
        mem.copy_htod(t.data_ptr(), host, t.numel() * 4, stream)
        mem.synchronize(stream)
        assert bool((t == -1.5).all())
    finally:
        mem.destroy_stream(stream)
        mem.free_pinned(host)


def test_impossible_allocation_fails_with_the_cuda_error(mem):
    with pytest.raises(Exception, match=r"(?i)memory|cudaMalloc"):
        mem.alloc(1 << 50)  # 1 PiB
    buf = mem.alloc(MiB)  # and the binding still works afterwards (the error is not sticky)
    mem.free(buf)


# -- the PyTorch runner on CUDA -------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (torch.cuda.is_available() is False)")
    return torch.device("cuda")


@pytest.fixture(scope="module")
def cpu_model(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def gpu_model(cd16x_dir, cuda):
    return load_cd_folder(cd16x_dir).to(cuda)


def _tf32_state() -> tuple:
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        return (cudnn_conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


def test_cuda_runner_runs_ieee_float32_while_active_and_restores_the_settings(gpu_model):
    before = _tf32_state()
    with TorchRunner(gpu_model):
        assert torch.backends.cudnn.allow_tf32 is False  # still legal to read: legacy and per-operator flags agree
        assert torch.backends.cuda.matmul.allow_tf32 is False
    assert _tf32_state() == before
    with TorchRunner(gpu_model, tf32=True):  # opted in: PyTorch's settings are left alone
        assert _tf32_state() == before


def test_cuda_runner_turns_tf32_off_after_the_caller_mixed_the_tf32_apis(gpu_model):
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):
        pytest.skip(f"PyTorch {torch.__version__} has no per-operator fp32_precision settings")
    saved = _tf32_state()
    try:
        conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"  # now the legacy flag cannot be read
        with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
            torch.backends.cudnn.allow_tf32
        with TorchRunner(gpu_model):
            assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32" and torch.backends.cudnn.rnn.fp32_precision == "ieee"
    finally:
        conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    assert _tf32_state() == saved


def test_reflect_pad_by_concatenation_equals_f_pad(cuda):
    # The path CUDA takes for tensors past 2**31 elements, forced here on a small one.
    from ultrastyle.models.networks import reflect_pad

    x = torch.randn(1, 5, 7, 9, device=cuda)
    for p in (1, 2):
        assert torch.equal(reflect_pad(x, p, max_elements=0), torch.nn.functional.pad(x, (p,) * 4, mode="reflect"))


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_stage_networks_on_cuda_match_the_cpu(cpu_model, gpu_model, stage):
    g = cpu_model.arch.grid(stage)
    gen = torch.Generator().manual_seed(stage)
    x = torch.rand(1, 3, 24 * g if stage < 4 else 12 * g, 20 * g if stage < 4 else 10 * g, generator=gen)
    c = cpu_model.arch.feature_channels(stage)
    a = torch.eye(c, dtype=torch.float64) * 0.7 + torch.randn(c, c, generator=gen, dtype=torch.float64) * 0.02
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1
    ref_f = cpu_model.encode(stage, x)
    ref_y = cpu_model.decode(stage, ref_f, a, b)
    with TorchRunner(gpu_model) as r:
        f = r.encode(stage, x.cuda())
        y = r.decode(stage, ref_f.cuda(), a, b)
    assert f.device.type == "cuda" and f.dtype == torch.float32
    df = (f.cpu() - ref_f).abs().max().item()
    dy = (y.cpu() - ref_y).abs().max().item()
    print(f"stage {stage}: features max {df:.2e} (scale {ref_f.abs().max():.1f}), image max {dy:.2e}")
    assert df <= 1e-4 * max(1.0, ref_f.abs().max().item())
    assert dy <= 1e-4


def test_feature_statistics_on_cuda_equal_the_cpus(cuda):
    f = torch.rand(1, 64, 96, 80, generator=torch.Generator().manual_seed(3)) * 4
    on_cpu, on_gpu = FeatureStats.of(f), FeatureStats.of(f.to(cuda))
    assert on_gpu.count == on_cpu.count and on_gpu.sum.device.type == "cpu"
    # Float64 band GEMMs on both (FeatureStats.of): equal up to float64 summation order.
    torch.testing.assert_close(on_gpu.sum, on_cpu.sum, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(on_gpu.outer, on_cpu.outer, rtol=1e-12, atol=1e-9)


def _tiled(net, content, style_img, opts, levels=DEFAULT_LEVELS):
    stats = style_statistics_tiled(net, canvas_from_array(style_img.numpy(), layout="chw"), levels, opts)
    with canvas_from_array(content.numpy(), layout="chw") as cv:
        out = stylize_tiled(net, cv, stats, opts, method="wct", alpha=0.6, levels=levels)
        try:
            return torch.from_numpy(out.numpy().copy())
        finally:
            out.close()


def test_tiled_equals_whole_image_on_cuda_and_both_match_the_cpu(cpu_model, gpu_model, photo, style):
    # The exact-tiling contract (1e-4 in [0, 1], float32) on the GPU, and the GPU against the CPU reference.
    content = photo[:, 3:, 5:]  # off the pooling grid
    cpu_ref = stylize(cpu_model, content, style_statistics(cpu_model, style, DEFAULT_LEVELS)).clamp(0, 1)
    with TorchRunner(gpu_model) as r:
        whole = stylize(r, content, style_statistics(r, style, DEFAULT_LEVELS)).cpu().clamp(0, 1)
        tiled = _tiled(r, content, style, TilingOptions(tile=64)).clamp(0, 1)
        budget = _tiled(r, content, style, TilingOptions(max_memory=24 * MiB)).clamp(0, 1)
    d_tile = (tiled - whole).abs().max().item()
    d_budget = (budget - whole).abs().max().item()
    d_cpu = (whole - cpu_ref).abs().max().item()
    print(f"cuda tiled vs whole {d_tile:.2e}, budget-tiled vs whole {d_budget:.2e}, cuda whole vs cpu whole {d_cpu:.2e}")
    assert d_tile <= 1e-4 and d_budget <= 1e-4
    # Float32 convolutions of two devices, amplified by the whitening: 6.9e-5 max on an H100 with float64
    # statistics on both (float32 statistics on the CPU: 1.9e-3; TF32 convolutions: 3e-2).
    assert d_cpu <= 2e-4 and (whole - cpu_ref).abs().mean().item() <= 5e-5


def test_tiled_run_keeps_gpu_memory_within_the_budget(gpu_model, photo, style, cuda):
    budget = 64 * MiB
    opts = TilingOptions(max_memory=budget, whole_if_area_fits=False)  # tiles at every stage, not whole stages
    with TorchRunner(gpu_model) as r:
        assert len(plan_image_for(r, *photo.shape[-2:], DEFAULT_LEVELS, opts).stage(5).encode_tiles()) > 1
        stats = style_statistics_tiled(r, canvas_from_array(style.numpy(), layout="chw"), DEFAULT_LEVELS, opts)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        with canvas_from_array(photo.numpy(), layout="chw") as cv:
            stylize_tiled(r, cv, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS).close()
        peak = torch.cuda.max_memory_allocated(cuda) - base
        assert r.memory_bytes() > 0  # the model's weights
    print(f"peak tile memory on the GPU {peak / MiB:.1f} MiB for a {budget / MiB:.0f} MiB budget")
    assert 0 < peak <= budget


def test_overlapped_tile_io_on_cuda_with_host_canvases(gpu_model, photo, style, cuda):
    # Canvases in RAM (a device budget they take more than half of), tiles read ahead and written behind through
    # page-locked memory and a copy stream (runtime/tile_io.py): the synchronous pass's result, the whole image's
    # within the exact-tiling contract, and the budget kept with the region read ahead.
    content = torch.nn.functional.interpolate(photo[None], size=(1024, 1536), mode="bilinear")[0].clamp(0, 1).contiguous()
    budget = 64 * MiB
    opts = TilingOptions(max_memory=budget, whole_if_area_fits=False)
    outs, peaks, reserved = {}, {}, {}
    with TorchRunner(gpu_model) as r:
        plan = plan_image_for(r, 1024, 1536, DEFAULT_LEVELS, opts)
        assert plan.site.device is None and plan.options.overlap_io is True and len(plan.stage(1).decode_tiles()) > 4
        stats = style_statistics(r, style, DEFAULT_LEVELS)
        whole = stylize(r, content, stats).cpu().clamp(0, 1)
        for overlap in (False, True):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(cuda)
            torch.cuda.reset_peak_memory_stats(cuda)
            with canvas_from_array(content.numpy(), layout="chw") as cv:
                out = stylize_tiled(r, cv, stats, replace(opts, overlap_io=overlap), method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
                try:
                    outs[overlap] = torch.from_numpy(out.numpy().copy()).clamp(0, 1)
                finally:
                    out.close()
            peaks[overlap] = torch.cuda.max_memory_allocated(cuda) - base
            reserved[overlap] = torch.cuda.max_memory_reserved(cuda)
    d_sync = (outs[True] - outs[False]).abs().max().item()
    d_whole = (outs[True] - whole).abs().max().item()
    print(f"overlapped vs synchronous {d_sync:.2e}, vs whole {d_whole:.2e}; peak allocated {peaks[True] / MiB:.1f} / "
          f"{peaks[False] / MiB:.1f} MiB, peak reserved {reserved[True] / MiB:.1f} / {reserved[False] / MiB:.1f} MiB")  # fmt: skip
    assert d_sync <= 1e-5 and d_whole <= 1e-4
    assert 0 < peaks[True] <= budget


def test_cli_stylize_on_cuda_matches_the_cpu(shared_dir, cd16x_dir, tmp_path, cuda):
    import tifffile

    from ultrastyle.cli.main import app

    content = shared_dir / "images/content/cd_content_in1.jpg"
    style_img = shared_dir / "images/style/cd_style_in4.jpg"
    outs = {}
    for dev in ("cpu", "cuda"):
        for tile in (True, False):
            out = tmp_path / f"{dev}-{tile}"
            args = ["stylize", str(content), "--style", str(style_img), "-m", str(cd16x_dir), "--backend", "torch",
                    "--device", dev, "--content-size", "256", "--style-size", "256", "-o", str(out), "-f", "tiff", "--depth", "16"]  # fmt: skip
            if tile:
                args += ["--tile", "64"]
            else:
                args.append("--no-tile")
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0, r.output
            (path,) = out.iterdir()
            outs[dev, tile] = torch.from_numpy(tifffile.imread(path).astype(np.float32) / 65535)
    ref = outs["cpu", False]
    for key, img in outs.items():
        d = (img - ref).abs().max().item()
        print(f"{key}: max abs diff from cpu whole-image {d:.2e}")
        assert d <= 1e-4 + 1 / 65535, key  # 1e-4 before quantisation, plus one 16-bit rounding step


# -- half precision, torch.compile and the device fit on CUDA ----------------------------------

# On [0, 1] outputs of the 5-stage cascade against float32 (as tests/test_torch_precision.py on the CPU).
HALF_TOL = {"fp16": (0.1, 0.005), "bf16": (0.6, 0.03)}


def _psnr(y: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * float(torch.log10(1 / (y - ref).square().mean().clamp_min(1e-20)))


@pytest.fixture(scope="module")
def cuda_reference(gpu_model, photo, style):
    with TorchRunner(gpu_model) as r:
        return stylize(r, photo, style_statistics(r, style, DEFAULT_LEVELS)).clamp(0, 1)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cuda_matches_float32(gpu_model, photo, style, cuda_reference, precision):
    with TorchRunner(gpu_model, precision=precision) as r:
        whole = stylize(r, photo, style_statistics(r, style, DEFAULT_LEVELS)).clamp(0, 1)
        tiled = _tiled(r, photo, style, TilingOptions(tile=64)).clamp(0, 1)
    for name, y in (("whole", whole.cpu()), ("tiled", tiled)):
        d = (y - cuda_reference.cpu()).abs()
        print(f"{precision} {name} vs float32: max {d.max():.3g}, mean {d.mean():.3g}, PSNR {_psnr(y, cuda_reference.cpu()):.1f} dB")
        assert d.max().item() <= HALF_TOL[precision][0] and d.mean().item() <= HALF_TOL[precision][1], name


def test_fp16_on_cuda_is_accepted_and_fp32_flags_are_restored(gpu_model):
    with TorchRunner(gpu_model, precision="fp16") as r:
        f = r.encode(5, torch.rand(1, 3, 64, 64, device="cuda"))
        assert f.dtype == torch.float32 and r.engine is not None and r.engine.dtype == torch.float16


def test_compiled_networks_on_cuda_match_eager(gpu_model, tmp_path, monkeypatch):
    # One stage (5), one shape, fp32 and fp16: compiled (Inductor, Triton kernels) with the map folded vs eager.
    from ultrastyle.runtime.backends.torch_engine import COMPILE_CACHE_ENV

    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "inductor"))
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 256, 192, generator=gen).cuda()
    c = gpu_model.arch.feature_channels(5)
    a = (torch.eye(c, dtype=torch.float64) * 0.8 + torch.randn(c, c, generator=gen, dtype=torch.float64) * 0.03).cuda()
    b = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.1).cuda()
    with TorchRunner(gpu_model) as ref:
        ref_y = ref.decode(5, ref.encode(5, x), a, b)
    tol = {"fp32": 1e-4, "fp16": 0.05}
    for precision in ("fp32", "fp16"):
        with TorchRunner(gpu_model, precision=precision) as eager, TorchRunner(gpu_model, precision=precision, compile=True) as comp:
            y_eager = eager.decode(5, eager.encode(5, x), a, b)
            y = comp.decode(5, comp.encode(5, x), a, b)
            assert comp.engine is not None and comp.engine.compile_count() == 2
        d_eager, d_ref = (y - y_eager).abs().max().item(), (y - ref_y).abs().max().item()
        print(f"{precision} compiled vs eager {d_eager:.2e}, vs eager fp32 {d_ref:.2e}")
        assert d_eager <= tol[precision] and d_ref <= tol[precision]
    assert any((tmp_path / "inductor").iterdir())  # the on-disk cache where it was pointed


def test_device_fit_on_cuda_equals_the_host_fit(gpu_model, photo, style):
    with TorchRunner(gpu_model) as r:
        stats = style_statistics(r, style, DEFAULT_LEVELS)
        on_device = stylize(r, photo, stats, fit_on="device").cpu()
        on_host = stylize(r, photo, stats, fit_on="host").cpu()
    d = (on_device - on_host).abs().max().item()
    print(f"fit on the GPU vs on the CPU: max {d:.2e}")
    assert d <= 1e-5  # float64 eigh on two devices, then float32 networks


def test_a_stage_synchronises_only_for_its_statistics(gpu_model, photo, style):
    # Device-to-host waits inside a whole-image stage, counted by PyTorch's sync debug mode: the content
    # statistics (Σf and Σffᵀ, two copies) and eigh's own error check, on a queue those copies already drained.
    import warnings

    from ultrastyle.core.padding import pad_to_grid
    from ultrastyle.runtime.cascade import stylize_stage

    counts = {}
    with TorchRunner(gpu_model, precision="fp16") as r:
        stats = style_statistics(r, style, DEFAULT_LEVELS)
        x = photo[None].cuda()
        for k in DEFAULT_LEVELS:  # warm: the style's colouring matrices cached, kernels loaded
            stylize_stage(r, pad_to_grid(x, 16), k, stats, method="wct", alpha=0.6)
        torch.cuda.synchronize()
        for fit_on in ("device", "host"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    y = x
                    for k in DEFAULT_LEVELS:
                        y = stylize_stage(r, y, k, stats, method="wct", alpha=0.6, fit_on=fit_on)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[fit_on] = sum("synchroniz" in str(w.message) for w in caught)
    print(f"synchronising calls over 5 stages: fit on the device {counts['device']}, on the host {counts['host']}")
    # 3 a stage expected (two statistics copies, eigh's error check); one more a stage allowed for another torch's
    # eigh checks: a wait per kernel would be tens more
    assert 1 <= counts["device"] <= 4 * len(DEFAULT_LEVELS)


@pytest.mark.parametrize("regions", [0, 2], ids=["one-map", "two-regions"])
def test_a_tiled_pass_one_waits_for_the_device_once_not_per_tile(gpu_model, photo, regions):
    # Pass 1 adds its tiles' statistics on the device and copies the total once (FeatureStats.to_host), so
    # the host queues tile after tile without waiting: synchronising calls counted by sync debug mode.
    # With mask regions each region's pixels are picked by indices found on the host (core.styles.region_indices).
    import warnings

    import numpy as np

    from ultrastyle.core.styles import Regions, Target
    from ultrastyle.runtime.tiled import encode_statistics

    opts = TilingOptions(tile=64, cache_features=False)  # ~20 tiles; canvases fit on the device
    with TorchRunner(gpu_model) as r:
        plan = plan_image_for(r, *photo.shape[-2:], (1,), opts)
        assert plan.site.device is not None  # device canvases: no host copies of tiles either
        stage = plan.stage(1)
        assert len(stage.encode_tiles()) > 4
        with canvas_from_array(photo.numpy(), layout="chw", device=plan.site.device) as cv:
            mask = None
            if regions:
                labels = np.zeros(photo.shape[-2:], dtype=np.int64)
                labels[:, labels.shape[1] // 3 :] = 1
                mask = Regions(labels, (Target(({},)),) * regions)
            encode_statistics(r, 1, cv, stage, regions=mask)  # warm: kernels loaded
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    stats = encode_statistics(r, 1, cv, stage, regions=mask)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    print(f"synchronising calls in pass 1 over {len(stage.encode_tiles())} tiles, {regions or 1} region(s): {syncs}")
    parts = stats if isinstance(stats, list) else [stats]
    assert all(p.sum.device.type == "cpu" for p in parts)
    assert sum(p.count for p in parts) == plan.stage(1).height * plan.stage(1).width
    assert syncs <= 1 + 2 * len(parts)  # the total's two copies (Σf, Σffᵀ) per region, and one spare


@pytest.mark.parametrize("regions", [0, 2], ids=["one-map", "two-regions"])
def test_a_tiled_decode_pass_does_not_wait_per_tile(gpu_model, photo, regions):
    # Pass 2 with device canvases: A and b (or each region's map, copied once per pass) on the device,
    # region pixels picked by indices found on the host; nothing comes back per tile.
    import warnings

    from ultrastyle.core.styles import Regions, Target, identity_map
    from ultrastyle.runtime.tiled import decode_tiles, encode_statistics

    opts = TilingOptions(tile=64, cache_features=True)
    with TorchRunner(gpu_model) as r:
        plan = plan_image_for(r, *photo.shape[-2:], (1,), opts, masked=True)
        assert plan.site.device is not None
        stage = plan.stage(1)
        assert stage.cache and len(stage.decode_tiles()) > 4
        channels = r.arch.feature_channels(1)
        mask = None
        if regions:
            labels = np.zeros(photo.shape[-2:], dtype=np.int64)
            labels[: labels.shape[0] // 2] = 1
            mask = (Regions(labels, (Target(({},)),) * regions), [identity_map(channels)] * regions)
        a, b = (t.cuda() for t in identity_map(channels))
        with canvas_from_array(photo.numpy(), layout="chw", device=plan.site.device) as src, \
                Canvas.at(plan.site, *src.shape) as dst, \
                Canvas.at(plan.site, channels, stage.height // stage.grid, stage.width // stage.grid) as feats:  # fmt: skip
            encode_statistics(r, 1, src, stage, feats)
            decode_tiles(r, 1, src, dst, stage, a, b, feats, regions=mask)  # warm
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    decode_tiles(r, 1, src, dst, stage, a, b, feats, regions=mask)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out = torch.from_numpy(dst.numpy())
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    print(f"synchronising calls in pass 2 over {len(stage.decode_tiles())} tiles, {regions or 1} map(s): {syncs}")
    assert bool(torch.isfinite(out).all()) and out.abs().sum() > 0  # every tile decoded
    assert syncs <= 2 * regions + 1  # each region's A and b copied to the device once per pass


def test_cli_device_index_runs_on_that_gpu_and_refuses_one_past_the_last(shared_dir, cd16x_dir, tmp_path, cuda):
    """``--device cuda:0`` is ``--device cuda``, to the bit; ``cuda:N`` with N GPUs is one line, exit 2, before any work."""
    from PIL import Image

    from ultrastyle.cli.main import app

    content = shared_dir / "images/content/cd_content_in1.jpg"
    style_img = shared_dir / "images/style/cd_style_in4.jpg"

    def run(dev: str, out: str):
        return CliRunner().invoke(app, ["stylize", str(content), "--style", str(style_img), "-m", str(cd16x_dir), "--backend", "torch",
                                        "--device", dev, "--content-size", "128", "--style-size", "128", "-o", str(tmp_path / out),
                                        "-f", "tiff"])  # not PNG: its encoder needs imagecodecs, not on the GPU machine

    pixels = {}
    for dev in ("cuda", "cuda:0", "CUDA:0"):
        r = run(dev, dev.replace(":", "_"))
        assert r.exit_code == 0, r.output
        (path,) = (tmp_path / dev.replace(":", "_")).iterdir()
        pixels[dev] = np.asarray(Image.open(path))
    assert np.array_equal(pixels["cuda"], pixels["cuda:0"]) and np.array_equal(pixels["cuda"], pixels["CUDA:0"])
    n = torch.cuda.device_count()
    r = run(f"cuda:{n}", "past")
    assert r.exit_code == 2 and f"PyTorch sees {n} CUDA device(s) here, cuda:0 to cuda:{n - 1}" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "past").exists()
