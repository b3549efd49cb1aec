"""Optimization-based stylization: the exact tiled gradient, the solvers, resume, the API and the CLI.

Tiny images and few iterations: the point is equality with the whole-image
autograd reference and the solvers' contracts, not the looks.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.core.canvas import Canvas, canvas_from_array
from ultrastyle.optimization import vectors as vec
from ultrastyle.optimization.loss import (
    LossNetwork, LossWeights, evaluate, loss_and_gradient, plan_gradient, reference_loss, style_target,
)  # fmt: skip
from ultrastyle.api import OptionError
from ultrastyle.optimization.run import Optimizer, StateWarning, make_optimize_options, upsample

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def encoder(cd16x_dir: Path):
    from ultrastyle.models.convert import cd_encoder

    return cd_encoder(cd16x_dir / "5SE.pth", 5)


@pytest.fixture(scope="module")
def optimizer(cd16x_dir: Path) -> Optimizer:
    return Optimizer(cd16x_dir)


def _chw(t: torch.Tensor) -> Canvas:
    return canvas_from_array(t.float().numpy(), layout="chw")


def _images(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, h, w, generator=g)
    content = (image + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1)
    return image, torch.rand(3, 37, 52, generator=g), content


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "size, core, two_pass",
    [
        ((75, 130), None, False),  # the whole image: one forward, one backward
        ((40, 27), 64, True),  # smaller than one tile, through both passes
        ((75, 130), 32, True),  # larger than a tile, off the grid both ways
        ((96, 64), 48, True),  # on the grid
    ],
)
def test_tiled_gradient_equals_the_whole_image_autograd(encoder, device, dtype, size, core, two_pass, one_thread):
    from ultrastyle.runtime.backends.torch_backend import ieee_fp32

    with ieee_fp32(device):  # as `Optimizer.run` holds it: in TF32 (PyTorch's CUDA default) tiles drift ~3e-2 off the whole
        _check_tiled_gradient(encoder, device, dtype, size, core, two_pass)


def _check_tiled_gradient(encoder, device, dtype, size, core, two_pass) -> None:
    net = LossNetwork(copy.deepcopy(encoder).to(device=device, dtype=dtype))
    weights = LossWeights(content_weight=2.0, style_weight=1e-3, layer_weights={"relu1_1": 1.0, "relu2_1": 0.5, "relu3_1": 2.0, "relu4_1": 1.0, "relu5_1": 3.0})
    image, style, content = _images(*size)
    x = image.to(device, dtype).clone().requires_grad_(True)
    ref = reference_loss(net, x, style.to(device, dtype), content.to(device, dtype), weights)
    ref.backward()
    want = x.grad.double().cpu()
    plan = plan_gradient(net, *size, core)
    assert plan.one_tile == (core is None or size == (40, 27))
    target = style_target(net, _chw(style), _chw(content), weights, core)
    grad = Canvas(3, *size)
    known = evaluate(net, _chw(image), target, weights, plan) if two_pass else None
    value = loss_and_gradient(net, _chw(image), target, weights, plan, grad, known=known)
    got = torch.from_numpy(grad.numpy()).double()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= TOL[dtype], f"tiled gradient differs from the whole image's by {rel:.2e} (relative)"
    assert value.total == pytest.approx(ref.item(), rel=TOL[dtype])
    assert value.content > 0 and all(v > 0 for v in value.style.values())


def test_the_tiles_of_a_plan_cover_the_padded_image_once(encoder):
    net = LossNetwork(encoder)
    plan = plan_gradient(net, 75, 130, 32)
    cover = np.zeros((plan.padded_height, plan.padded_width), int)
    for t in plan.tiles:
        cover[t.rows.start : t.rows.stop, t.cols.start : t.cols.stop] += 1
        assert t.region_rows.start <= max(0, t.rows.start - net.halo) and t.region_rows.stop >= min(plan.padded_height, t.rows.stop + net.halo)
    assert (cover == 1).all() and len(plan.tiles) > 4


def test_banded_vectors_and_upsampling_match_numpy_and_torch(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 70, 41), dtype=np.float32), rng.random((3, 70, 41), dtype=np.float32)
    old = vec.BAND_BYTES
    vec.BAND_BYTES = 3 * 41 * 4 * 16  # 16-row bands: several per vector
    try:
        ca, cb = canvas_from_array(a, layout="chw", disk_dir=tmp_path), canvas_from_array(b, layout="chw")
        assert vec.dot(ca, cb) == pytest.approx(float(np.dot(a.ravel().astype(np.float64), b.ravel())), rel=1e-12)
        vec.combine(ca, [(2.0, ca), (-0.5, cb)])
        np.testing.assert_allclose(ca.numpy(), 2 * a - 0.5 * b, rtol=1e-6)
        vec.save(ca, tmp_path / "a.npy")
        back = Canvas(3, 70, 41)
        vec.load(tmp_path / "a.npy", back)
        assert np.array_equal(back.numpy(), ca.numpy())
        with pytest.raises(ValueError, match="expected float32"):
            vec.load(tmp_path / "a.npy", Canvas(3, 71, 41))
        np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), ca.numpy())  # a plain .npy file for numpy too
        (tmp_path / "cut.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-100])
        with pytest.raises(ValueError, match="ends early"):
            vec.load(tmp_path / "cut.npy", Canvas(3, 70, 41))
    finally:
        vec.BAND_BYTES = old
    src = torch.from_numpy(a)
    dst = Canvas(3, 157, 90)
    upsample(_chw(src), dst, band=20)
    want = F.interpolate(src[None], size=(157, 90), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(dst.numpy(), want.numpy(), atol=1e-5)  # torch computes the coordinates in float32


def _grams(net: LossNetwork, img: np.ndarray) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        taps = net.encoder.taps(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    return {t: (a[0].flatten(1) @ a[0].flatten(1).T / a[0, 0].numel()).double() for t, a in taps.items()}


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_the_loss_decreases_and_the_grams_move_to_the_style(optimizer, photo, style, solver, one_thread):
    content = (photo[:, ::5, ::5].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # 64 px long side
    style_px = (style.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    losses = []
    out = optimizer.run(content, style_px, iterations=6, solver=solver, max_memory=None, lr=0.02, style_size=max(style_px.shape),
                        on_progress=lambda e: losses.append(e.value.total))  # fmt: skip
    assert out.shape == content.shape and out.dtype == np.uint8
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    if solver == "lbfgs":  # Armijo steps: every accepted point is lower
        assert all(b <= a for a, b in zip(losses, losses[1:]))
    net = optimizer.net
    gs, gc, go = _grams(net, style_px), _grams(net, content), _grams(net, out)
    dist = lambda g: sum(float(((g[t] - gs[t]) ** 2).sum()) for t in gs)  # noqa: E731
    assert dist(go) < dist(gc)


@pytest.mark.parametrize("solver", ["lbfgs", "adam"])
def test_resume_continues_to_the_uninterrupted_result(optimizer, photo, style, tmp_path, solver, one_thread):
    content = photo[:, ::4, ::4].permute(1, 2, 0).numpy().copy()  # 80 px long side
    settings = dict(iterations=3, scales=(48, 0), solver=solver, tile=32, max_memory="8MB", scratch=tmp_path,
                    save_every=2, style_size=48, lr=0.02)  # fmt: skip
    whole = optimizer.run(content, style.permute(1, 2, 0).numpy().copy(), **settings)
    state = tmp_path / "state"
    seen = []

    def stop(e):
        seen.append((e.scale, e.iteration, e.tiles))
        if (e.scale, e.iteration) == (1, 1):  # after the save at the end of scale 0, before the one at (1, 2)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimizer.run(content, style.permute(1, 2, 0).numpy().copy(), state_dir=state, on_progress=stop, **settings)
    assert (state / "state.json").is_file() and not list(tmp_path.glob(".state.*"))
    assert seen[-1][2] > 1  # the full scale ran tiled
    resumed = []
    again = optimizer.run(content, style.permute(1, 2, 0).numpy().copy(), state_dir=state,
                          on_progress=lambda e: resumed.append((e.scale, e.iteration)), **settings)  # fmt: skip
    assert resumed == [(1, 1), (1, 2), (1, 3)]
    assert np.array_equal(again, whole)
    assert not state.exists()  # removed once the output exists


def test_a_state_from_other_settings_is_not_resumed(optimizer, photo, style, tmp_path, one_thread):
    content = photo[:, ::8, ::8].permute(1, 2, 0).numpy().copy()
    st = style.permute(1, 2, 0).numpy().copy()

    def stop(e):
        if e.iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimizer.run(content, st, iterations=3, save_every=1, state_dir=tmp_path / "s", on_progress=stop, max_memory=None)
    steps = []
    with pytest.warns(StateWarning, match="the saved state is of other inputs or settings; starting over"):  # it was dropped in silence
        optimizer.run(content, st, iterations=3, save_every=1, state_dir=tmp_path / "s", style_weight=1.0, max_memory=None,
                      on_progress=lambda e: steps.append(e.iteration))  # fmt: skip
    assert steps == [1, 2, 3]


def test_options_name_the_keyword():
    from ultrastyle.api import OptionError

    for bad, option in (
        (dict(init="zeros"), "init"), (dict(solver="sgd"), "solver"), (dict(scales="1024,512"), "scales"),
        (dict(scales="big"), "scales"), (dict(layer_weights=[1, 2]), "layer_weights"), (dict(max_memory="lots"), "max_memory"),
        (dict(content_layer="conv4_2"), "content_layer"), (dict(style_weight=-1.0), "style_weight"),
        # text where a number belongs: an OptionError, not a TypeError from a comparison
        (dict(content_weight="1"), "content_weight"), (dict(lr="0.1"), "lr"), (dict(layer_weights={"relu1_1": "x"}), "layer_weights"),
        (dict(seed="a"), "seed"), (dict(style_weight=float("nan")), "style_weight"),
    ):  # fmt: skip
        with pytest.raises(OptionError) as info:
            make_optimize_options(**bad)
        assert info.value.option == option
    assert make_optimize_options(scales="512, 1024, full").scales == (512, 1024, 0)


def test_a_budget_too_small_for_one_tile_is_an_option_error(optimizer, photo, style):
    import re

    from ultrastyle.api import OptionError

    with pytest.raises(OptionError, match="4 MiB is too small for one tile of the loss network on this image; give at least") as info:
        optimizer.run(photo.permute(1, 2, 0).numpy().copy(), style.permute(1, 2, 0).numpy().copy(), iterations=1, max_memory="4MiB")
    assert info.value.option == "max_memory"
    least = int(re.search(r"give at least (\d+) MiB", info.value.message).group(1))
    # The figure it names runs, even where the image's canvases would fit in RAM beside no tile: they go to disk then.
    big = np.zeros((200, 200, 3), np.uint8)
    assert optimizer.run(big, style.permute(1, 2, 0).numpy().copy(), iterations=0, max_memory=f"{least}MiB", solver="adam").shape == (200, 200, 3)
    with pytest.raises(OptionError, match=f"give at least {least} MiB"):
        optimizer.run(big, style.permute(1, 2, 0).numpy().copy(), iterations=0, max_memory=f"{least - 1}MiB", solver="adam")
    # Below the smallest tile, an image small enough runs whole: the budget is judged per image, not refused outright.
    small = np.zeros((64, 64, 3), np.uint8)
    assert optimizer.run(small, small, iterations=0, max_memory="32MB").shape == (64, 64, 3)


def test_the_api_function_is_the_runner_s():
    import ultrastyle
    from ultrastyle.optimization.run import optimize

    assert ultrastyle.optimize is optimize


def test_cli_runs_a_batch_past_a_bad_file_and_writes_atomically(cd16x_dir, shared_dir, tmp_path, one_thread):
    from ultrastyle.cli.main import app

    good = tmp_path / "in" / "a.png"
    good.parent.mkdir()
    Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((48, 36)).save(good)
    bad = tmp_path / "in" / "b.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "optimize", str(tmp_path / "in"), "--style", str(shared_dir / "images/style/cd_style_in3.jpg"), "-o", str(out),
        "--iterations", "2", "--style-size", "48", "--model", str(cd16x_dir), "--tile", "32",
    ])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "b.png" in result.output and "1 done, 0 skipped, 1 failed of 2" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a_optimized_cd_style_in3.png"]  # no state, no temp left
    assert Image.open(out / "a_optimized_cd_style_in3.png").size == (48, 36)
    bad_flag = CliRunner().invoke(app, ["optimize", str(good), "--style", str(good), "--scales", "64,32"])
    assert bad_flag.exit_code == 2 and "--scales" in bad_flag.output
    # The style as the last argument, as stylize takes it (it was "Missing option '--style'")
    last = CliRunner().invoke(app, ["optimize", str(good), str(shared_dir / "images/style/cd_style_in3.jpg"), "-o", str(tmp_path / "o2"),
                                    "--iterations", "0", "--style-size", "48", "--model", str(cd16x_dir)])  # fmt: skip
    assert last.exit_code == 0 and [p.name for p in (tmp_path / "o2").iterdir()] == ["a_optimized_cd_style_in3.png"], last.output
    seeded = CliRunner().invoke(app, ["optimize", str(good), str(shared_dir / "images/style/cd_style_in3.jpg"), "-o", str(tmp_path / "o3"),
                                      "--iterations", "0", "--style-size", "48", "--model", str(cd16x_dir), "--seed", "3"])  # fmt: skip
    assert seeded.exit_code == 0 and "warning: --seed seeds --init noise; this run starts from the content: left out" in seeded.output
    alone = CliRunner().invoke(app, ["optimize", str(good)])
    assert alone.exit_code == 2 and "give a style image with --style, or as the last" in alone.output


def test_cli_takes_an_output_files_format_from_its_suffix_and_refuses_what_cannot_work(cd16x_dir, shared_dir, tmp_path, one_thread):
    from ultrastyle.cli.main import app

    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"

    def run(*args: object):
        return CliRunner().invoke(app, ["optimize", str(content), *map(str, args), "--style", str(style), "--iterations", "0",
                                        "--content-size", "48", "--style-size", "48", "--model", str(cd16x_dir)])  # fmt: skip

    r = run("-o", tmp_path / "one.jpg")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "one.jpg") as im:
        assert im.format == "JPEG"
    refused = {
        "webp": run("-o", tmp_path / "x.webp"),
        "clash": run("-f", "jpg", "-o", tmp_path / "x.png"),
        "two contents": run(shared_dir / "images/content/cd_content_in4.jpg", "-o", tmp_path / "z.png"),
        "budget": run("--max-memory", "1MB", "-o", tmp_path / "y.png"),
        "tile and no tile": run("--tile", "64", "--no-tile", "-o", tmp_path / "w.png"),
        "budget and no tile": run("--max-memory", "10KB", "--no-tile", "-o", tmp_path / "u.png"),  # it was dropped in silence
        "zero weights": run("--content-weight", "0", "--style-weight", "0", "-o", tmp_path / "v.png"),
    }
    assert {k: r.exit_code for k, r in refused.items()} == dict.fromkeys(refused, 2), {k: r.output for k, r in refused.items()}
    text = {k: " ".join(r.output.replace("│", " ").split()) for k, r in refused.items()}
    assert ".webp images are read, not written" in text["webp"] and "make them agree" in text["clash"]
    assert "2 contents were given; give a folder" in text["two contents"]
    assert "--max-memory" in text["budget"] and "too small for one tile of the loss network" in text["budget"]
    assert "give one of them" in text["tile and no tile"]
    assert "--no-tile evaluates whole images, which --max-memory would tile or place" in text["budget and no tile"]
    assert "--content-weight 0 and --style-weight 0: the loss would be 0" in " ".join(text["zero weights"].replace("│", " ").split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jpg"]  # nothing made for a refused run


@pytest.mark.parametrize(("save_every", "said"), [
    (0, "no state of this run was saved yet"), (1, "with --skip-existing (the finished images are not redone) to resume it from its last saved state"),
])  # fmt: skip
def test_cli_ctrl_c_says_whether_a_rerun_resumes(cd16x_dir, shared_dir, tmp_path, save_every, said):
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    marker = tmp_path / "third-evaluation"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import ultrastyle.optimization.run as run
        real, calls = run.loss_and_gradient, []
        def slow(*a, **k):  # the run is still going when Ctrl-C comes
            calls.append(1)
            if len(calls) == 3:
                Path({str(marker)!r}).touch()
            time.sleep(0.3 if len(calls) >= 3 else 0)
            return real(*a, **k)
        run.loss_and_gradient = slow
        from ultrastyle.cli.main import app
        sys.argv = ["ultrastyle", "optimize", {str(shared_dir / "images/content/cd_content_in2.jpg")!r}, "--style",
                    {str(shared_dir / "images/style/cd_style_in3.jpg")!r}, "-o", {str(tmp_path / "out")!r}, "--model", {str(cd16x_dir)!r},
                    "--content-size", "48", "--style-size", "48", "--iterations", "200", "--solver", "adam", "--save-every", "{save_every}"]
        app()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        end = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < end:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    text = " ".join(stderr.split())
    assert "error:" not in text and stdout.startswith("0 done, 0 skipped, 0 failed of 1 images in "), (stdout, stderr)  # not an error
    assert stdout.rstrip().endswith("; no output was written"), stdout
    assert said in text, stderr
    states = list((tmp_path / "out").glob(".*.optimize-state"))
    assert len(states) == bool(save_every)
    if save_every:  # the state is hidden: the line says where it is and how much it holds
        assert re.search(rf"\({re.escape(str(states[0]))}, \d+ [KM]iB; delete it to start over\)", text), stderr


def test_api_typos_and_model_settings_are_option_errors(optimizer, cd16x_dir):
    import ultrastyle

    with pytest.raises(OptionError, match="did you mean 'iterations'"):
        ultrastyle.optimize("any.png", "any.png", model=cd16x_dir, iteration=1)  # before the model loads or a file is read
    with pytest.raises(OptionError, match="setting of the model"):
        optimizer.run("any.png", "any.png", device="cuda")
    with pytest.raises(OptionError, match="make them agree"):  # as Stylizer.stylize: the output's suffix and format= agree
        optimizer.run("any.png", "any.png", output="out.png", format="jpg")
    with pytest.raises(OptionError, match="threads"):
        Optimizer(cd16x_dir, threads=-1)


def test_wct_init_is_ultrastyles_own_wct_result(optimizer, cd16x_dir, shared_dir, one_thread):
    import ultrastyle

    content = np.asarray(Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((64, 48)))
    art = shared_dir / "images/style/cd_style_in3.jpg"
    start = Optimizer(cd16x_dir).run(content, art, init="wct", iterations=0, max_memory=None)
    wct = ultrastyle.stylize(content, art, model=cd16x_dir, style_size=64, max_memory=None)
    assert np.abs(start.astype(int) - wct).max() <= 1
    assert np.abs(start.astype(int) - content).mean() > 10  # not the content itself


def test_the_memory_plan_puts_large_canvases_on_disk_and_fits_a_region_in_the_budget(encoder, tmp_path):
    from ultrastyle.optimization.run import BYTES_PER_REGION_PIXEL, plan_memory, scale_sizes

    net = LossNetwork(encoder)
    opts = make_optimize_options(max_memory="1GB", scratch=tmp_path)
    big = plan_memory(net, 3266, 4899, opts, net.channels("relu4_1"))  # 16 MP: 15 L-BFGS vectors are 2.9 GB
    assert big.site.disk_dir == str(tmp_path) and big.core is not None
    region = big.core + 2 * net.halo
    assert region**2 * BYTES_PER_REGION_PIXEL <= 2**30 < (region + 2 * net.grid) ** 2 * BYTES_PER_REGION_PIXEL
    small = plan_memory(net, 200, 300, opts, net.channels("relu4_1"))
    assert small.site.disk_dir is None and small.core is None  # RAM, one tile
    assert scale_sizes(300, 200, (64, 128, 0)) == [(64, 43), (128, 85), (300, 200)]
    assert scale_sizes(300, 200, (512, 0)) == [(300, 200)]


def test_a_vgg19_shaped_encoder_works_the_same(one_thread):
    from ultrastyle.models.networks import Encoder
    from ultrastyle.core.arch import ARCHS

    torch.manual_seed(0)  # random weights: the tiling does not depend on them
    net = LossNetwork(Encoder(ARCHS["vgg19"], 5).double())
    assert net.taps == ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1") and net.channels("relu5_1") == 512
    weights = LossWeights(style_weight=1e-3)
    image, style, content = _images(50, 41, seed=1)
    x = image.double().clone().requires_grad_(True)
    reference_loss(net, x, style.double(), content.double(), weights).backward()
    target = style_target(net, _chw(style), _chw(content), weights, 32)
    grad = Canvas(3, 50, 41)
    loss_and_gradient(net, _chw(image), target, weights, plan_gradient(net, 50, 41, 32), grad)
    got = torch.from_numpy(grad.numpy()).double()
    assert float((got - x.grad).abs().max() / x.grad.abs().max()) <= 1e-5


def test_layers_the_loss_network_lacks_are_refused_or_left_out_with_a_warning(cd16x_dir, tmp_path):
    from ultrastyle.api import OptionError

    three = tmp_path / "three"  # a model of stages 1-3: its loss network stops at relu3_1
    three.mkdir()
    for k in (1, 2, 3):
        for s in ("SE", "SD"):
            (three / f"{k}{s}.pth").write_bytes((cd16x_dir / f"{k}{s}.pth").read_bytes())
    opt = Optimizer(three)
    assert opt.net.taps[-1] == "relu3_1"
    with pytest.raises(OptionError, match=r"relu4_1 is not a layer of .* which has relu1_1, relu2_1, relu3_1") as info:
        opt.check(make_optimize_options())  # the default content layer
    assert info.value.option == "content_layer"
    with pytest.raises(OptionError, match=r"relu5_1: not layers"):
        opt.check(make_optimize_options(content_layer="relu2_1", layer_weights=[1, 1, 1, 0, 1]))
    opt.check(make_optimize_options(content_layer="relu2_1", layer_weights=[1, 1, 1, 0, 0]))  # weighed 0: fine
    with pytest.warns(UserWarning, match="leaves out relu4_1, relu5_1"):
        opt.check(make_optimize_options(content_layer="relu2_1"))


def test_a_style_larger_than_the_content_is_tiled_for_its_own_size(cd16x_dir, monkeypatch):
    # The content fits one tile (core None); the style, 4x its side, must not run whole past the budget.
    import ultrastyle.optimization.run as run

    seen = []
    real = run.style_target
    monkeypatch.setattr(run, "style_target", lambda *a, **k: seen.append(k["style_core"]) or real(*a, **k))
    content = np.zeros((48, 48, 3), np.uint8) + 100
    style = (np.random.default_rng(0).random((384, 384, 3)) * 255).astype(np.uint8)
    with Optimizer(cd16x_dir) as opt:
        whole = run.plan_memory(opt.net, 48, 48, make_optimize_options(max_memory="64MB"), 512)
        assert whole.core is None  # the content alone: one tile
        opt.run(content, style, iterations=0, scales="full", style_size=384, max_memory="64MB")
    assert seen and seen[0] is not None and seen[0] < 384  # the style pass was tiled


def test_optimize_batch_from_python_runs_past_a_bad_file_and_skips_what_exists(cd16x_dir, shared_dir, tmp_path, one_thread):
    import ultrastyle

    good = tmp_path / "in" / "a.png"
    good.parent.mkdir()
    Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((48, 36)).save(good)
    (tmp_path / "in" / "b.png").write_bytes(b"not an image")
    style = shared_dir / "images/style/cd_style_in3.jpg"
    seen: list[str] = []
    summary = ultrastyle.optimize_batch([tmp_path / "in"], style, tmp_path / "out", model=cd16x_dir, iterations=1, style_size=48,
                                        tile=32, on_result=lambda r: seen.append(r.status))  # fmt: skip
    assert [r.status for r in summary.results] == ["done", "failed"] == seen
    assert summary.results[0].pair.output == tmp_path / "out" / "a_optimized_cd_style_in3.png" and summary.results[0].megapixels > 0
    assert "b.png" in summary.results[1].error
    again = ultrastyle.optimize_batch([good], style, tmp_path / "out", model=cd16x_dir, iterations=1, style_size=48, skip_existing=True)
    assert [r.status for r in again.results] == ["skipped"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError) as info:  # before the model loads
        ultrastyle.optimize_batch([tmp_path / "empty"], style, tmp_path / "out", model=cd16x_dir)
    assert info.value.option == "contents"
    with pytest.raises(OptionError) as info:
        ultrastyle.optimize_batch([good, good.parent / "b.png"], style, tmp_path / "one.png", model=cd16x_dir)
    assert info.value.option == "output"


def test_cli_names_the_flag_of_a_setting_one_image_cannot_take(cd16x_dir, shared_dir, tmp_path, one_thread, monkeypatch):
    from ultrastyle.cli.main import app
    from ultrastyle.optimization.run import Optimizer

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((48, 36)).save(folder / name)
    real = Optimizer.run

    def run(self, content, *args, **kwargs):
        if Path(content).name == "b.png":  # as a budget too small for this image's canvases and tiles
            raise OptionError("max_memory", "too small for this image: its canvases need 3 GB")
        return real(self, content, *args, **kwargs)

    monkeypatch.setattr(Optimizer, "run", run)
    result = CliRunner().invoke(app, ["optimize", str(folder), "--style", str(shared_dir / "images/style/cd_style_in3.jpg"),
                                      "-o", str(tmp_path / "out"), "--iterations", "0", "--style-size", "48", "--model", str(cd16x_dir)])  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"{folder / 'b.png'}: --max-memory: too small for this image" in text, text


def test_optimize_outputs_refuse_a_file_in_the_way_and_take_any_case_of_suffix(shared_dir, tmp_path):
    from ultrastyle.api import output_format
    from ultrastyle.optimization.batch import plan_outputs

    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub", tmp_path / "afile" / "one.png"):
        with pytest.raises(OptionError, match="is a file") as info:  # before any optimization, not at the write after it
            plan_outputs([content], style, out, "png")
        assert info.value.option == "output"
    assert [output_format(tmp_path / n, None) for n in ("a.JPG", "b.Png", "c.jpeg", "d.TIF", "e")] == ["jpg", "png", "jpg", "tiff", "png"]
    assert output_format(tmp_path / "a.JPG", "jpeg") == "jpg"


def test_outputs_that_would_replace_an_input_or_each_other_are_refused(shared_dir, tmp_path):
    import shutil

    from ultrastyle.optimization.batch import plan_outputs

    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    for src in (content, style):  # -o naming an input would overwrite it
        shutil.copy(src, tmp_path / src.name)
    for out in (tmp_path / content.name, tmp_path / style.name):
        with pytest.raises(OptionError, match="is one of the inputs") as info:
            plan_outputs([tmp_path / content.name], tmp_path / style.name, out, "jpg")
        assert info.value.option == "output"
    long = tmp_path / f"{'c' * 240}.jpg"  # its output name, {content}_optimized_{style}.jpg, past 255 bytes: after the compute, once
    shutil.copy(content, long)
    with pytest.raises(OptionError, match=r"longer than a file name may be \(255\)"):
        plan_outputs([long], tmp_path / style.name, tmp_path / "out", "jpg")
    for sub in ("x", "y"):  # one name in two folders: one output file
        (tmp_path / sub).mkdir()
        shutil.copy(content, tmp_path / sub / "p.jpg")
    with pytest.raises(OptionError, match=r"x/p.jpg and .*y/p.jpg would both write .*p_optimized_cd_style_in3.png") as info:
        plan_outputs([tmp_path / "x", tmp_path / "y"], style, tmp_path / "out", "png")
    assert info.value.option == "contents"
    one = plan_outputs(str(tmp_path / "x" / "p.jpg"), style, tmp_path / "out", "png")  # one path, not its characters
    assert [p.content for p in one] == [tmp_path / "x" / "p.jpg"]
    with pytest.raises(OptionError, match="not a Deep Zoom folder"):
        plan_outputs([content], style, tmp_path / "f.dzi", "png")
    # A rerun into the contents' own folder: the earlier output is not a content; one file named two ways is one content.
    shutil.copy(content, tmp_path / "x" / "p_optimized_cd_style_in3.png")
    again = plan_outputs([tmp_path / "x", tmp_path / "x" / "p.jpg"], style, tmp_path / "x", "png")
    assert [p.content.name for p in again] == ["p.jpg"]
    assert [p.content.name for p in plan_outputs([tmp_path / "x"], style, tmp_path / "x", "tiff")] == ["p.jpg"]  # in another format
    state = tmp_path / "x" / ".p_optimized_cd_style_in3.png.optimize-state"
    state.mkdir()
    (state / "notes.txt").write_text("not ours")
    with pytest.raises(OptionError, match="optimization state is saved, holds something else"):
        plan_outputs([tmp_path / "x" / "p.jpg"], style, tmp_path / "x", "png")


def test_a_state_dir_that_is_not_a_saved_state_is_refused_and_left_alone(optimizer, shared_dir, tmp_path):
    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("also precious")
    for state in (keep, tmp_path / "afile"):
        with pytest.raises(OptionError, match="a run replaces its state folder") as info:
            optimizer.run(content, style, state_dir=state, iterations=0, content_size=32, style_size=32)
        assert info.value.option == "state_dir"
    assert (keep / "notes.txt").read_text() == "precious" and (tmp_path / "afile").read_text() == "also precious"
    out = optimizer.run(content, style, state_dir=tmp_path / "new", iterations=0, content_size=32, style_size=32)  # absent: fine
    assert out.shape == (32, 32, 3) and not (tmp_path / "new").exists()  # the 420x420 content at 32 px; the state removed once done


def test_an_output_name_that_contradicts_the_options_format_is_refused(optimizer, shared_dir, tmp_path):
    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    with pytest.raises(OptionError, match="format 'png' but .*x.jpg ends in .jpg"):  # it once wrote PNG bytes into x.jpg
        optimizer.run(content, style, output=tmp_path / "x.jpg", options=make_optimize_options(iterations=0, content_size=32))
    assert not (tmp_path / "x.jpg").exists()


def test_one_optimized_image_refuses_to_replace_its_content_or_style_or_a_folder(optimizer, shared_dir, tmp_path):
    import shutil

    content, style = tmp_path / "c.jpg", tmp_path / "s.jpg"
    shutil.copy(shared_dir / "images/content/cd_content_in2.jpg", content)
    shutil.copy(shared_dir / "images/style/cd_style_in3.jpg", style)
    before = content.read_bytes(), style.read_bytes()
    for output in (content, style):
        with pytest.raises(OptionError, match="is one of the inputs; writing it would replace that image"):
            optimizer.run(content, style, output=output, iterations=0, content_size=32)
    with pytest.raises(OptionError, match="is a folder; give a file name"):
        optimizer.run(content, style, output=tmp_path, iterations=0, content_size=32)
    assert (content.read_bytes(), style.read_bytes()) == before


def test_optimizer_settings_the_machine_cannot_run_are_typed_errors(cd16x_dir):
    from ultrastyle.errors import RunnerError

    with pytest.raises(OptionError, match="dtype"):
        Optimizer(cd16x_dir, dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(RunnerError, match="no CUDA device is available"):  # not torch's AssertionError
            Optimizer(cd16x_dir, device="cuda")
        with pytest.raises(RunnerError, match=r"device='cuda:1': no CUDA device is available"):  # the GPU asked for, not 'cuda'
            Optimizer(cd16x_dir, device="CUDA:1")
    with pytest.raises(OptionError, match="expected cpu, cuda or cuda:N, got None"):  # not the string 'None'
        Optimizer(cd16x_dir, device=None)


def test_optimize_cli_refuses_dzi_and_webp_outputs_with_its_own_formats_and_takes_max_pixels(shared_dir, cd16x_dir, tmp_path):
    from ultrastyle.cli.main import app

    content, style = shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    base = ["optimize", str(content), "--style", str(style), "--model", str(cd16x_dir), "--iterations", "0"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "w.webp")])
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "(png, jpg, tiff)" in text and "tiff, dzi" not in text, text  # not stylize's list, which has dzi
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "f.dzi")])
    assert r.exit_code == 2 and "not a Deep Zoom folder" in " ".join(r.output.replace("│", " ").split()), r.output
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "out"), "--max-pixels", "1000"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"style {style}:" in text and "(--max-pixels); raise the limit" in text, text  # the style: once
    small = tmp_path / "small.png"
    Image.open(style).convert("RGB").resize((30, 20)).save(small)
    r = CliRunner().invoke(app, [*base[:3], str(small), *base[4:], "-o", str(tmp_path / "out"), "--max-pixels", "1000"])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and f"{content}:" in text and "(--max-pixels); raise the limit" in text, text  # the content: it fails


def test_a_style_that_every_content_would_fail_on_is_refused_once_before_the_model_opens(shared_dir, tmp_path, monkeypatch):
    import ultrastyle
    from ultrastyle.cli.main import app
    from ultrastyle.io.images import ImageError

    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))  # an empty zoo: opening the model would mean a download
    monkeypatch.setenv("ULTRASTYLE_MIRROR", "http://127.0.0.1:9/nowhere")
    contents = [shared_dir / "images/content/cd_content_in2.jpg", shared_dir / "images/content/cd_content_in4.jpg"]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = CliRunner().invoke(app, ["optimize", *map(str, contents), "--style", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.count("error:") == 1, r.output
    assert f"style {bad}: not an image file" in " ".join(r.output.split()) and "download" not in r.output, r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ImageError, match="style .*bad.jpg: not an image file"):
        ultrastyle.optimize_batch(contents, bad, tmp_path / "out")
    cut = tmp_path / "cut.jpg"  # a good header, then too few bytes: each content failed on it in turn, after the model opened
    data = (shared_dir / "images/style/cd_style_in3.jpg").read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    r = CliRunner().invoke(app, ["optimize", *map(str, contents), "--style", str(cut), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "truncated" in r.output and "download" not in r.output, r.output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.pth"))
    from ultrastyle.optimization.batch import check_style, plan_outputs

    pairs = plan_outputs(contents, bad, tmp_path / "out", "png")
    for p in pairs:  # every output there: with skip_existing nothing reads the style, so nothing refuses it
        p.output.parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(p.output)  # done before
    check_style(bad, 10**9, pairs, skip_existing=True)
    with pytest.raises(ImageError):
        check_style(bad, 10**9, pairs, skip_existing=False)


def test_a_style_tiff_pillow_cannot_open_is_read_and_one_above_the_limit_refused_from_its_header(tmp_path, monkeypatch):
    import tifffile

    import ultrastyle.optimization.batch as batch
    from ultrastyle.io.images import ImageError

    tifffile.imwrite(tmp_path / "f.tif", np.random.default_rng(0).random((30, 40, 3), dtype=np.float32), photometric="rgb")
    batch.check_style(tmp_path / "f.tif", 10**9)  # read through tifffile, whole (a truncated file has a good header)
    monkeypatch.setattr(batch, "read_input", lambda *a, **k: pytest.fail("decoded a style above the limit to check it"))
    with pytest.raises(ImageError, match=r"style .*f.tif: 40x30 = 1200 pixels is above the limit of 1000 pixels"):
        batch.check_style(tmp_path / "f.tif", 1000)


def test_a_fixed_tile_that_costs_more_than_expected_is_a_tile_warning(optimizer):
    from ultrastyle import TileWarning

    with pytest.warns(TileWarning, match=r"tile 16 px is small beside the loss network's halo of 80 px.* a tile of (\d+) px") as seen:
        optimizer.check(make_optimize_options(tile=16))
    enough = int(re.search(r"a tile of (\d+) px", str(seen[0].message)).group(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.check(make_optimize_options(tile=enough))  # the size it names is quiet
        optimizer.check(make_optimize_options())  # an automatic tile is never warned about
    with pytest.warns(TileWarning, match="more than the 100 MiB memory budget"):
        optimizer.check(make_optimize_options(tile=4000, max_memory="100MB"))


def test_a_log_gets_plain_progress_lines_at_each_scale_not_a_bar(cd16x_dir, shared_dir, tmp_path, one_thread, monkeypatch):
    import ultrastyle.cli.logs
    from ultrastyle.cli.main import app

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # what would make rich take the log for a terminal
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ultrastyle.cli.logs, "LOG_LINE_SECONDS", 1e9)  # milestones only, however slow the machine

    content = tmp_path / "c.png"
    Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((64, 48)).save(content)
    r = CliRunner().invoke(app, ["optimize", str(content), "--style", str(content), "-o", str(tmp_path / "out"), "--model", str(cd16x_dir),
                                 "--iterations", "2", "--scales", "32,full"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [x for x in r.output.splitlines() if x.startswith("c_optimized_c.png: iteration")]
    assert [x.split(" loss")[0] for x in lines] == [
        "c_optimized_c.png: iteration 2/2 scale 1/2 32x24", "c_optimized_c.png: iteration 2/2 scale 2/2 64x48"
    ], r.output
    assert "━" not in r.output  # no bar drawn into the log
    r = CliRunner().invoke(app, ["optimize", str(content), "--style", str(content), "-o", str(tmp_path / "quiet"), "--model", str(cd16x_dir),
                                 "--iterations", "2", "--scales", "32,full", "--quiet"])  # fmt: skip
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.startswith("1 done, 0 skipped, 0 failed of 1 images"), r.output


def test_a_saved_state_is_resumed_by_skip_existing_and_a_damaged_one_starts_over(optimizer, cd16x_dir, photo, style, tmp_path, one_thread):
    """A user review: --skip-existing (the advice after Ctrl-C) kept an older output of the same name over the interrupted
    run's saved state, and a truncated state file failed every rerun."""
    from ultrastyle.optimization.batch import plan_outputs, run_batch, state_dir_for

    Image.fromarray((photo[:, ::8, ::8].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "c.png")
    Image.fromarray((style.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "s.png")
    opts = make_optimize_options(iterations=3, save_every=1, max_memory=None)
    (pair,) = plan_outputs(tmp_path / "c.png", tmp_path / "s.png", tmp_path / "out", "png")
    fresh = optimizer.run(pair.content, tmp_path / "s.png", options=opts)
    pair.output.parent.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(pair.output)  # an older run's output

    def stop(e):
        if e.iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimizer.run(pair.content, tmp_path / "s.png", options=opts, state_dir=state_dir_for(pair.output), on_progress=stop)
    assert optimizer.resumes(pair.content, tmp_path / "s.png", opts, state_dir_for(pair.output))
    other = make_optimize_options(iterations=3, save_every=1, max_memory=None, style_weight=1.0)
    assert not optimizer.resumes(pair.content, tmp_path / "s.png", other, state_dir_for(pair.output))
    (result,) = run_batch(optimizer, [pair], other, skip_existing=True).results  # a state this run would not resume: the file is kept
    assert result.status == "skipped" and np.asarray(Image.open(pair.output)).shape == (4, 4, 3)
    (result,) = run_batch(optimizer, [pair], opts, skip_existing=True).results
    assert result.status == "done" and np.array_equal(np.asarray(Image.open(pair.output)), fresh)

    with pytest.raises(KeyboardInterrupt):
        optimizer.run(pair.content, tmp_path / "s.png", options=opts, state_dir=state_dir_for(pair.output), on_progress=stop)
    x = state_dir_for(pair.output) / "solver" / "x.npy"
    x.write_bytes(x.read_bytes()[:-16])  # short: what a power cut after the rename could leave
    with pytest.warns(StateWarning, match="the saved state cannot be read .*; starting over"):
        again = optimizer.run(pair.content, tmp_path / "s.png", options=opts, state_dir=state_dir_for(pair.output))
    assert np.array_equal(again, fresh) and not state_dir_for(pair.output).exists()


def test_what_a_run_does_not_read_does_not_stop_a_resume_and_api_inputs_are_checked_as_the_cli_checks_them():
    import ultrastyle

    with pytest.raises(OptionError, match="did you mean 'state_dir'"):  # the call's own keywords, as stylize's
        ultrastyle.optimize("c.png", "s.png", stat_dir="x")
    base = make_optimize_options()
    assert make_optimize_options(seed=7).trajectory() == base.trajectory()  # the seed is noise's
    assert make_optimize_options(init="noise", seed=7).trajectory() != make_optimize_options(init="noise").trajectory()
    assert make_optimize_options(lr=0.5).trajectory() == base.trajectory()  # lr is Adam's
    assert make_optimize_options(solver="adam", history=9).trajectory() == make_optimize_options(solver="adam").trajectory()
    assert make_optimize_options(layer_weights="1, 2,1,1,1").layer_weights == make_optimize_options(layer_weights=[1, 2, 1, 1, 1]).layer_weights
    with pytest.raises(OptionError, match="layer_weights: all 0 with content_weight=0"):
        make_optimize_options(content_weight=0, layer_weights=[0] * 5)
    with pytest.raises(OptionError, match="scales: expected long sides in pixels"):
        make_optimize_options(scales=[48.7])  # it ran at 48 px


def test_the_state_folder_of_an_output_name_near_the_limit_fits_and_stays_its_own(tmp_path):
    from ultrastyle.optimization.batch import state_dir_for
    from ultrastyle.runtime.pairs import NAME_MAX

    a, b = tmp_path / ("x" * 240 + "_a.png"), tmp_path / ("x" * 240 + "_b.png")  # outputs that fit; ".NAME.optimize-state" did not
    states = [state_dir_for(a), state_dir_for(b)]
    assert all(len(s.name.encode()) <= NAME_MAX and s.parent == tmp_path for s in states) and states[0] != states[1]
    from ultrastyle.io.atomic import atomic_dir

    for s in states:
        with atomic_dir(s) as tmp:  # as the state is saved: an OSError (File name too long) after the compute before
            (tmp / "state.json").write_text("{}")
        assert (s / "state.json").is_file()
    assert state_dir_for(tmp_path / "short.png").name == ".short.png.optimize-state"


def test_a_batch_whose_contents_all_fail_leaves_no_output_folder(cd16x_dir, shared_dir, tmp_path, one_thread):
    import ultrastyle

    bad = tmp_path / "bad.jpg"
    data = (shared_dir / "images/content/cd_content_in2.jpg").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    summary = ultrastyle.optimize_batch([bad], shared_dir / "images/style/cd_style_in3.jpg", tmp_path / "out" / "sub", model=cd16x_dir,
                                        iterations=1, style_size=48)  # fmt: skip
    assert summary.count("failed") == 1 and not (tmp_path / "out").exists()  # an empty folder was left before
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    ultrastyle.optimize_batch([bad], shared_dir / "images/style/cd_style_in3.jpg", tmp_path / "kept", model=cd16x_dir, iterations=1,
                              style_size=48)  # fmt: skip
    assert (tmp_path / "kept").is_dir()


def test_python_saves_an_optimization_as_often_as_the_command_line():
    import inspect

    from ultrastyle.cli.optimize import optimize_command
    from ultrastyle.optimization.constants import DEFAULT_SAVE_EVERY

    # optimize_batch saved only after each scale (0): a batch interrupted mid-image kept nothing to resume from
    assert make_optimize_options().save_every == DEFAULT_SAVE_EVERY == inspect.signature(optimize_command).parameters["save_every"].default


def test_ieee_fp32_is_held_on_cuda_only_and_the_callers_tf32_settings_come_back(monkeypatch):
    """The optimizer ran its CUDA float32 convolutions in TF32 (PyTorch's default), where tiled != whole."""
    import ultrastyle.runtime.backends.torch_backend as tb

    calls: list[str] = []
    monkeypatch.setattr(tb, "_fp32_exact", lambda: calls.append("off") or [("flag", "was", "on")])
    monkeypatch.setattr(tb, "_restore_fp32", lambda changed: calls.append(f"restore {changed}"))
    with tb.ieee_fp32("cpu"):
        assert calls == []
    with tb.ieee_fp32(torch.device("cuda", 1)):
        assert calls == ["off"]
        with tb.ieee_fp32("cuda"):  # nested (a runner open too): set once, restored once, by the last to let go
            assert calls == ["off"]
        assert calls == ["off"]
    assert calls == ["off", "restore [('flag', 'was', 'on')]"]
    with pytest.raises(ZeroDivisionError), tb.ieee_fp32("cuda:0"):
        1 / 0
    assert calls[-1].startswith("restore")  # an error inside restores too


def test_an_optimizer_run_holds_ieee_fp32_on_its_device(optimizer, monkeypatch):
    import ultrastyle.optimization.run as run

    seen: list[str] = []

    @contextlib.contextmanager
    def spy(device):
        seen.append(str(device))
        yield

    monkeypatch.setattr(run, "ieee_fp32", spy)
    monkeypatch.setattr(optimizer, "_run_or_restart", lambda *a: "ran")
    assert optimizer.run(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), iterations=1) == "ran" and seen == ["cpu"]


def test_optimize_outputs_differing_only_in_case_collide_where_the_disk_ignores_case(shared_dir, tmp_path, monkeypatch):
    import shutil

    import ultrastyle.optimization.batch as batch

    content, style = shared_dir / "images/content/cd_content_in1.jpg", shared_dir / "images/style/cd_style_in3.jpg"
    shutil.copy(content, tmp_path / "Photo.jpg")
    shutil.copy(content, tmp_path / "photo.png")
    files = [tmp_path / "Photo.jpg", tmp_path / "photo.png"]
    assert len(batch.plan_outputs(files, style, tmp_path / "out", "png")) == 2  # this disk tells the names apart
    monkeypatch.setattr(batch, "ignores_case", lambda folder: True)
    with pytest.raises(OptionError, match=r"Photo\.jpg and .*photo\.png would both write"):
        batch.plan_outputs(files, style, tmp_path / "out", "png")
