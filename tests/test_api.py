"""The Python API (`ultrastyle.stylize`, `load`, `Stylizer`, `stylize_batch`) against the CLI and the reference."""

from __future__ import annotations

import hashlib
import pydoc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ultrastyle
from ultrastyle.cli.main import app
from ultrastyle.io.images import array_to_tensor, load_image, read_image
from ultrastyle.models import zoo
from ultrastyle.models.pretrained import load_model
from ultrastyle.runtime.cascade import style_statistics
from ultrastyle.runtime.cascade import stylize as reference_stylize


@pytest.fixture(scope="module")
def small(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("api_in")
    out = {}
    for key, name, size in (
        ("c1", "content/cd_content_in1.jpg", (72, 56)),
        ("c2", "content/cd_content_in4.jpg", (61, 47)),
        ("s1", "style/cd_style_in3.jpg", (64, 64)),
        ("s2", "style/cd_style_in1.jpg", (64, 48)),
    ):
        with Image.open(shared_dir / "images" / name) as im:
            im.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(d / f"{key}.png")
        out[key] = d / f"{key}.png"
    return out


@pytest.fixture
def installed(cd16x_dir: Path) -> None:
    zoo.import_local("cd-wct-16x", cd16x_dir)


def test_public_names_are_exported_with_docstrings():
    for name in ("stylize", "stylize_batch", "load", "Stylizer", "make_options", "BatchSummary", "ImageError"):
        assert name in ultrastyle.__all__ and getattr(ultrastyle, name).__doc__, name
    text = pydoc.render_doc(ultrastyle, renderer=pydoc.plaintext)
    assert "stylize_batch" in text and "Stylizer" in text


def test_adain_zoo_model_runs_its_own_defaults_from_python(installed, small):
    """adain / alpha 1.0 / stage 4, as the CLI runs it; a library caller used to get wct / 0.6 / 5..1."""
    got = ultrastyle.stylize(small["c1"], small["s1"], model="ultrastyle-adain-16x", backend="torch", style_size=64)
    model = load_model("ultrastyle-adain-16x")
    content, style = load_image(small["c1"]), load_image(small["s1"])
    ref = reference_stylize(model, content, style_statistics(model, style, (4,)), method="adain", alpha=1.0, levels=(4,))
    ref8 = (ref.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert got.shape == (56, 72, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref8).max() <= 1
    wct = ultrastyle.stylize(small["c1"], small["s1"], model="ultrastyle-adain-16x", backend="torch", style_size=64,
                             method="wct", alpha=0.6)  # fmt: skip
    assert np.abs(got.astype(int) - wct.astype(int)).mean() > 5  # the defaults did change the result


def test_module_functions_take_every_keyword_of_the_stylizer_methods(installed, small, tmp_path):
    import inspect

    for fn, meth in ((ultrastyle.stylize, ultrastyle.Stylizer.stylize), (ultrastyle.stylize_batch, ultrastyle.Stylizer.stylize_batch)):
        kw = {n for n, p in inspect.signature(meth).parameters.items() if p.kind is p.KEYWORD_ONLY}
        assert kw <= set(inspect.signature(fn).parameters), (fn.__name__, kw)
    settings = dict(backend="torch", levels=(5,), style_size=64, tile=32)  # tiles: on_tile is called
    mix = [(small["s1"], 0.5), (small["s2"], 0.5)]
    tiles: list[int] = []
    got = ultrastyle.stylize(small["c1"], mix=mix, output=tmp_path / "one.jpg", on_tile=lambda *a: tiles.append(1), **settings)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        ref = s.stylize(small["c1"], mix=mix, style_size=64, tile=32)
    assert np.array_equal(got, ref) and tiles
    with Image.open(tmp_path / "one.jpg") as im:
        assert im.format == "JPEG"
    results = []
    summary = ultrastyle.stylize_batch([small["c1"]], [small["s1"], small["s2"]], tmp_path / "masked", mask=np.eye(56, 72, dtype=bool)[..., None]
                                       .repeat(3, 2).astype(np.uint8) * 255, on_result=results.append, **settings)  # fmt: skip
    assert summary.count("done") == 1 and [r.status for r in results] == ["done"]


def test_levels_a_model_lacks_are_an_option_error_naming_the_stages_it_has(installed, small):
    zoo.import_local("ultrastyle-adain-16x", None)
    with pytest.raises(ultrastyle.OptionError, match=r"has stage\(s\) \[4\], not \[5\]; choose levels among \[4\]") as e:
        ultrastyle.load("ultrastyle-adain-16x", backend="torch", levels=[5])
    assert e.value.option == "levels"
    with ultrastyle.load("ultrastyle-adain-16x", backend="torch", progress=False) as s, pytest.raises(ultrastyle.OptionError, match=r"not \[5\]"):
        s.options(levels=(5,))  # not "load the model with levels=[5]", which would fail
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,), progress=False) as s, pytest.raises(ultrastyle.OptionError, match="not loaded"):
        s.options(levels=(4,))  # the model has stage 4: loading it is the fix
    r = CliRunner().invoke(app, ["stylize", str(small["c1"]), "--style", str(small["s1"]), "--model", "ultrastyle-adain-16x", "--levels", "5"])
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "--levels" in said and "not [5]" in said, r.output  # refused before any work


def test_api_and_cli_write_byte_identical_files(installed, small, tmp_path):
    settings = dict(alpha=0.7, levels="5,3,1", max_memory="64MB", style_size=64)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5, 3, 1)) as s:
        s.stylize(small["c2"], small["s1"], output=tmp_path / "api.png", **settings)
        summary = s.stylize_batch([small["c1"], small["c2"]], [small["s1"]], tmp_path / "batch", **settings)
    assert summary.count("done") == 2
    r = CliRunner().invoke(app, ["stylize", str(small["c1"]), str(small["c2"]), "--style", str(small["s1"]),
                                 "-o", str(tmp_path / "cli"), "--backend", "torch", "--alpha", "0.7", "--levels", "5,3,1",
                                 "--max-memory", "64MB", "--style-size", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for name in ("c1_stylized_s1.png", "c2_stylized_s1.png"):
        assert digest(tmp_path / "cli" / name) == digest(tmp_path / "batch" / name)
    assert digest(tmp_path / "api.png") == digest(tmp_path / "cli" / "c2_stylized_s1.png")


def test_arrays_and_pil_images_give_the_same_result_as_their_files(installed, small):
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5, 4)) as s:
        from_files = s.stylize(small["c2"], small["s2"], levels=(5, 4), style_size=64)
        c = read_image(small["c2"])
        from_arrays = s.stylize(c, Image.open(small["s2"]), levels=(5, 4), style_size=64)
        from_float = s.stylize(c.astype(np.float32) / 255, read_image(small["s2"]), levels=(5, 4), style_size=64)
    assert np.array_equal(from_files, from_arrays)
    assert np.array_equal(from_files, from_float)


def test_style_statistics_are_cached_per_style(installed, small, monkeypatch):
    import ultrastyle.runtime.batch as batch

    calls = []
    real = batch.style_statistics_tiled
    monkeypatch.setattr(batch, "style_statistics_tiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        for _ in range(3):
            s.stylize(small["c1"], small["s1"], levels=(5,), style_size=64)
    assert len(calls) == 1


def test_mix_and_mask_from_python_equal_their_cli_outputs(installed, small, tmp_path):
    mask = np.zeros((47, 61, 3), np.uint8)
    mask[:, 30:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    kw = dict(levels=(5, 4), style_size=64)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5, 4)) as s:
        mixed = s.stylize(small["c2"], mix=[(small["s1"], 3), (small["s2"], 1)], **kw)
        masked = s.stylize(small["c2"], [small["s1"], small["s2"]], mask=mask, **kw)
    base = ["stylize", str(small["c2"]), "--backend", "torch", "--levels", "5,4", "--style-size", "64"]
    r = CliRunner().invoke(app, [*base, "--mix", f"{small['s1']}=3", "--mix", f"{small['s2']}=1", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*base, "--style", str(small["s1"]), "--style", str(small["s2"]),
                                 "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "k")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert np.array_equal(mixed, read_image(next((tmp_path / "m").iterdir())))
    assert np.array_equal(masked, read_image(next((tmp_path / "k").iterdir())))
    assert np.abs(mixed.astype(int) - masked.astype(int)).mean() > 1


@pytest.mark.parametrize(
    ("settings", "option"),
    [({"alpha": 2}, "alpha"), ({"levels": "5,x"}, "levels"), ({"max_memory": "lots"}, "max_memory"),
     ({"tile": 0}, "tile"), ({"format": "bmp"}, "format"), ({"depth": 16, "format": "jpg"}, "depth"),
     ({"max_memory": "1MB"}, "max_memory"), ({"levels": (2,)}, "levels"), ({"alpha": "0.5"}, "alpha"),
     ({"content_size": "256"}, "content_size"), ({"alpah": 0.5}, "alpah"), ({"backend": "torch"}, "backend"),
     ({"output": "x.jpg", "format": "png"}, "format"), ({"output": "x.webp"}, "output"), ({"skip_existing": True}, "skip_existing")],
)  # fmt: skip
def test_bad_settings_raise_option_error_naming_the_setting_not_a_flag(installed, small, settings, option):
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5, 4)) as s:
        with pytest.raises(ultrastyle.OptionError) as info:
            s.stylize(small["c1"], small["s1"], **settings)
    assert info.value.option == option and "--" not in str(info.value)


def test_a_mix_of_bare_paths_or_one_file_twice_is_an_option_error(installed, small):
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        for mix, said in (([small["s1"], small["s2"]], "(style, weight) pairs"), ([(small["s1"], 0.5), (str(small["s1"]), 0.5)], "given twice")):
            with pytest.raises(ultrastyle.OptionError, match=said.replace("(", r"\(").replace(")", r"\)")) as info:
                s.stylize(small["c1"], mix=mix)
            assert info.value.option == "mix"


def test_bool_and_integer_label_arrays_are_masks(installed, small):
    left = np.zeros((56, 72), bool)
    left[:, 36:] = True
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        rgba = np.zeros((56, 72, 4), np.uint8)
        rgba[left] = (200, 10, 10, 255)  # painted on a transparent layer: the transparent part is the first region
        outs = [s.stylize(small["c1"], [small["s1"], small["s2"]], mask=m, style_size=64)
                for m in (left.astype(np.uint8) * 255, left, left.astype(np.int64) + 7, rgba)]  # fmt: skip
        with pytest.raises(ultrastyle.OptionError, match="0..65535"):
            s.stylize(small["c1"], [small["s1"], small["s2"]], mask=left.astype(np.int64) - 1)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_bad_image_raises_image_error_naming_it(installed, small, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ultrastyle.ImageError, match="bad.png"):
        ultrastyle.stylize(bad, small["s1"], backend="torch", levels=(5,))


def test_whole_image_setting_equals_the_tiled_run(installed, small):
    with ultrastyle.load("cd-wct-16x", backend="torch") as s:
        whole = s.stylize(small["c1"], small["s1"], max_memory=None, style_size=64)
        tiled = s.stylize(small["c1"], small["s1"], tile=24, style_size=64)
    content = array_to_tensor(read_image(small["c1"]))
    assert whole.shape[:2] == tuple(content.shape[1:])
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1


def test_a_typo_or_a_model_setting_in_a_call_says_what_to_do():
    from ultrastyle.api import check_settings

    with pytest.raises(ultrastyle.OptionError, match="did you mean 'alpha'"):
        check_settings({"alpah": 0.5})
    with pytest.raises(ultrastyle.OptionError, match=r"ultrastyle.load"):
        check_settings({"device": "cuda"})
    check_settings({"alpha": 0.5, "levels": 5})  # real settings pass
    for typo, meant in (("mixes", "mix"), ("masks", "mask"), ("on_tiles", "on_tile"), ("styles", "style")):  # the call's own keywords
        with pytest.raises(ultrastyle.OptionError, match=f"did you mean '{meant}'"):  # (they suggested max_pixels, dzi_tiles...)
            ultrastyle.stylize("c.png", None, **{typo: 1})


def test_errors_a_caller_catches_are_importable_from_the_package():
    for name in ("RunnerError", "ZooError", "UnknownModelError", "CheckpointError", "ClusterError", "ClusterStylizer", "ModelDefaults",
                 "OptionError", "TileWarning"):  # fmt: skip
        assert isinstance(getattr(ultrastyle, name), type), name
    assert issubclass(ultrastyle.UnknownModelError, ultrastyle.ZooError)


def test_a_folder_without_weights_is_a_checkpoint_error_naming_it(tmp_path):
    with pytest.raises(ultrastyle.CheckpointError, match=f"{tmp_path}: no model weights"):
        ultrastyle.load(tmp_path)


def test_bad_runner_arguments_fail_before_any_model_is_opened():
    for kw, match in (({"device": "gpu"}, "device: expected cpu, cuda or cuda:N, got 'gpu'"), ({"device": "cuda:x"}, "got 'cuda:x'"),
                      ({"threads": -1}, "threads: expected a whole number"), ({"compile": "yes"}, "compile"), ({"backend": "bogus"}, "backend")):
        with pytest.raises(ultrastyle.OptionError, match=match) as info:
            ultrastyle.load("no-such-model-either", **kw)
        assert info.value.option == next(iter(kw))  # the keyword, for a front end to name its flag


def test_one_path_is_one_image_not_its_characters(installed, small, tmp_path):
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        summary = s.stylize_batch(str(small["c1"]), small["s1"], tmp_path / "out", levels=(5,), style_size=64)
    assert [r.status for r in summary.results] == ["done"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c1_stylized_s1.png"]


def test_a_stylizer_opens_again_after_its_with_block(installed, small):
    s = ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,))
    with s:
        first = s.stylize(small["c1"], small["s1"], levels=(5,), style_size=64)
    assert not s.runner.is_active  # closed: the networks freed
    with s:
        again = s.stylize(small["c1"], small["s1"], levels=(5,), style_size=64)
    after = s.stylize(small["c1"], small["s1"], levels=(5,), style_size=64)  # outside a with block too
    s.close()
    assert np.array_equal(first, again) and np.array_equal(first, after)


def test_a_style_file_created_or_replaced_after_a_call_is_read_again(installed, small, tmp_path):
    style = tmp_path / "late.png"
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        with pytest.raises(ultrastyle.ImageError, match="no such file"):
            s.stylize(small["c1"], style, levels=(5,), style_size=64)
        style.write_bytes(small["s1"].read_bytes())
        first = s.stylize(small["c1"], style, levels=(5,), style_size=64)  # the missing file's error was not kept
        style.write_bytes(small["s2"].read_bytes())
        os_stat = style.stat()
        import os

        os.utime(style, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))  # a new version, whatever the clock's resolution
        second = s.stylize(small["c1"], style, levels=(5,), style_size=64)
        expected = s.stylize(small["c1"], small["s2"], levels=(5,), style_size=64)
    assert not np.array_equal(first, second) and np.array_equal(second, expected)


def test_in_memory_images_read_as_their_files_would():
    from ultrastyle.io.sources import as_pixels

    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[:, :3] = (10, 20, 30, 255)  # left half opaque, right half transparent
    assert as_pixels(rgba)[0, 0].tolist() == [10, 20, 30] and as_pixels(rgba)[0, 5].tolist() == [255, 255, 255]
    assert np.array_equal(as_pixels(Image.fromarray(rgba, "RGBA")), as_pixels(rgba))  # PIL: over white too
    grey16 = Image.fromarray(np.full((3, 5), 40000, np.uint16))
    assert as_pixels(grey16).dtype == np.uint16 and int(as_pixels(grey16).max()) == 40000  # 16 bits kept
    tall = Image.fromarray(np.zeros((2, 7, 3), np.uint8))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 2 wide, 7 tall
    tall.info["exif"] = exif.tobytes()
    tall = Image.open(__import__("io").BytesIO(_jpeg_bytes(tall, exif)))
    assert as_pixels(tall).shape[:2] == (7, 2)
    with pytest.raises(ultrastyle.ImageError, match=r"\[0, 1\], got 0..200; divide"):
        as_pixels(np.linspace(0, 200, 12, dtype=np.float32).reshape(2, 2, 3))


def _jpeg_bytes(img: Image.Image, exif: Image.Exif) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_arrays_and_dotted_names_the_api_used_to_take(installed, small, tmp_path):
    c, s1 = read_image(small["c1"]), read_image(small["s1"])
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        one = s.stylize_batch(c, s1, tmp_path / "one", levels=(5,), style_size=64)  # one array each: one pair
        assert [r.status for r in one.results] == ["done"]
        stack = s.stylize_batch(np.stack([c, c]), [s1], tmp_path / "two", levels=(5,), style_size=64)  # (N, H, W, 3): N images
        assert len(stack.results) == 2
        s.stylize(c, s1, output=tmp_path / "frame.0001", format="png", levels=(5,), style_size=64)  # a dot that names no format
    assert (tmp_path / "frame.0001").read_bytes()[:4] == b"\x89PNG"


def test_a_runner_of_fewer_stages_than_its_bundle_says_so(installed):
    import re

    import torch

    # cuda:N is a device name (not an OptionError): where there is no second GPU, the runner says so; else it runs there.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        why = "no CUDA device is available to PyTorch here" if count == 0 else "PyTorch sees 1 CUDA device(s) here, cuda:0 to cuda:0"
        with pytest.raises(ultrastyle.RunnerError, match=re.escape(f"device='cuda:1': {why}")):
            ultrastyle.load("cd-wct-16x", device="cuda:1", backend="torch", levels=(5,))
    else:
        with ultrastyle.load("cd-wct-16x", device="cuda:1", backend="torch", levels=(5,)) as s:
            assert s.stages == (5,) and s.runner.device == torch.device("cuda:1")
    with ultrastyle.load("cd-wct-16x", backend="onnxruntime", levels=(5, 4)) as s:
        assert s.stages == (4, 5)


def test_a_fixed_tile_beyond_the_budget_is_a_tile_warning_and_an_automatic_one_is_not(installed, small):
    import warnings

    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,), progress=False) as s:
        with pytest.warns(ultrastyle.TileWarning, match=r"tile 2048 px makes stage 5 regions .* the run holds more than its budget"):
            s.stylize(small["c1"], small["s1"], style_size=64, tile=2048, max_memory="50MB")
        with warnings.catch_warnings():
            warnings.simplefilter("error", ultrastyle.TileWarning)
            s.stylize(small["c1"], small["s1"], style_size=64, max_memory="50MB")  # the planner keeps the budget


def test_an_interrupted_batch_summary_counts_every_pair_it_was_given(installed, small, tmp_path):
    seen = []

    def stop_after_first(r):  # Ctrl-C while the first result is reported
        seen.append(r)
        if len(seen) == 1:
            raise KeyboardInterrupt

    with pytest.raises(ultrastyle.BatchInterrupted) as info:
        ultrastyle.stylize_batch([small["c1"], small["c2"]], [small["s1"], small["s2"]], tmp_path / "o", backend="torch", levels=5,
                                 style_size=64, on_result=stop_after_first)  # fmt: skip
    summary = info.value.summary
    assert summary.planned == 4 and 1 <= len(summary.results) < 4
    outputs = [r.pair.output for r in summary.results]
    assert len(set(outputs)) == len(outputs), outputs  # each result once, though Ctrl-C came inside its callback
    assert sorted(p.name for p in outputs if p.exists()) == sorted(p.name for p in (tmp_path / "o").iterdir())
    assert summary.describe().split(" in ")[0].endswith("of 4 pairs"), summary.describe()


def test_a_mix_of_in_memory_styles_names_its_output_without_spaces(installed, small, tmp_path):
    a = np.asarray(Image.open(small["s1"]).convert("RGB"))
    b = Image.open(small["s2"]).convert("RGB")
    summary = ultrastyle.stylize_batch([small["c1"]], None, tmp_path / "o", mix=[(a, 1), (b, 1)], backend="torch", levels=5, style_size=64)
    (name,) = [p.name for p in (tmp_path / "o").iterdir()]
    assert summary.count("done") == 1 and name == "c1_stylized_style@0.5+style-2@0.5.png", name  # as in-memory contents: content, content-2


def test_a_large_style_s_canvas_goes_where_a_content_s_of_its_size_would_within_the_budget(installed, small, shared_dir, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    import ultrastyle.runtime.batch as batch

    style = tmp_path / "big_style.png"
    with Image.open(shared_dir / "images/style/cd_style_in3.jpg") as im:
        im.convert("RGB").resize((1600, 1200)).save(style)
    sites: list = []
    plan_image_for = batch.plan_image_for
    def spy(*args, **kwargs):
        plan = plan_image_for(*args, **kwargs)
        sites.append(plan.site)
        return plan

    monkeypatch.setattr(batch, "plan_image_for", spy)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        budgeted = s.stylize(small["c1"], style, style_size=0, max_memory="160MB", scratch=tmp_path)
        # The tiny content's canvases in RAM, the style's on disk: they would take more than the budget's share for RAM.
        assert [site.disk_dir for site in sites] == [None, str(tmp_path)], sites
        whole = s.stylize(small["c1"], style, style_size=0, max_memory=None)
    assert np.abs(budgeted.astype(int) - whole.astype(int)).max() <= 1


def test_a_stylizer_keeps_statistics_of_in_memory_styles_not_their_pixels(installed, small):
    from ultrastyle.io.sources import ImageInput

    rng = np.random.default_rng(0)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,)) as s:
        for _ in range(3):
            style = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
            s.stylize(small["c1"], style, style_size=64)
        keys = [k for book in s._books.values() for k in book._stats]
        assert len(keys) == 3 and not any(isinstance(part, ImageInput) for k in keys for part in k)
        for i in range(ultrastyle.api.BOOKS_KEPT + 2):  # settings a service may try: a bounded number of books
            s.stylize(small["c1"], small["s1"], style_size=32 + i)
        assert len(s._books) == ultrastyle.api.BOOKS_KEPT
        book = next(iter(s._books.values()))

        def fails() -> None:
            pixels = np.zeros((64, 64, 3), np.uint8)  # what a frame of a failed read holds  # noqa: F841
            raise ultrastyle.ImageError("style: unreadable")

        for _ in range(2):  # made, then found: each raise is of a copy
            with pytest.raises(ultrastyle.ImageError, match="unreadable"):
                book._remember(book._stats, ("failed",), fails)
        kept = book._stats[("failed",)]
        assert kept.__traceback__ is None and kept.__context__ is None  # a failed style is kept as its error alone
        for i in range(6):  # masks across settings: one store, bounded
            left = np.zeros((56, 72), np.uint8)
            left[:, : 10 + i] = 255
            s.stylize(small["c1"], [small["s1"], small["s2"]], mask=left, style_size=32 + i % 3)
        assert len(s._masks) == ultrastyle.runtime.batch.StyleBook.KEEP_MASKS


def test_in_memory_images_of_any_origin_are_read_or_refused_with_an_image_error_naming_them(small, tmp_path):
    from ultrastyle.io.images import AnimatedImageWarning
    from ultrastyle.io.sources import as_pixels

    grey = np.arange(0, 200, dtype=np.uint8).reshape(10, 20)
    with pytest.raises(ultrastyle.ImageError, match=r"content: float samples must lie in \[0, 1\], got 0..199; divide"):
        as_pixels(Image.fromarray(grey.astype(np.float32)), "content")  # mode F, 0..255: refused as the array is, not clipped
    with pytest.raises(ultrastyle.ImageError, match="convert it to 'I;16' .* or 'L'"):
        as_pixels(Image.fromarray(grey.astype(np.int32)), "content")  # mode I: its range is unknown
    assert np.array_equal(as_pixels(Image.fromarray(grey / np.float32(255))), as_pixels(grey / np.float32(255)))
    rgb16 = np.random.default_rng(0).integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(__import__("imagecodecs").png_encode(rgb16))
    for load in (False, True):  # Pillow decodes 16-bit RGB to 8 bits; the path keeps 16 (loaded, the image forgets its raw mode)
        with Image.open(tmp_path / "rgb16.png") as opened, pytest.warns(ultrastyle.io.sources.PrecisionWarning, match="give the file's path"):
            if load:
                opened.load()
            as_pixels(opened, "content")
    Image.fromarray(grey / np.float32(255)).save(tmp_path / "f.tif")  # a file of mode F: read by the file's rule
    with Image.open(tmp_path / "f.tif") as opened:
        assert np.array_equal(as_pixels(opened), ultrastyle.io.images.read_image(tmp_path / "f.tif"))
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "f255.tif")  # 0..255 in a float file: refused, as the array is
    with Image.open(tmp_path / "f255.tif") as opened, pytest.raises(ultrastyle.ImageError, match="content: float samples must lie in"):
        as_pixels(opened, "content")
    assert np.array_equal(as_pixels(grey[..., None]), as_pixels(grey))  # (H, W, 1) is grey too
    assert np.array_equal(as_pixels(grey.astype(">u2")), as_pixels(grey.astype(np.uint16)))  # big-endian samples
    cut = tmp_path / "cut.jpg"
    Image.open(small["c1"]).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ultrastyle.ImageError, match=r"style: cannot read the PIL image \(OSError: image file is truncated"):
        as_pixels(Image.open(cut), "style")
    with Image.open(small["c1"]) as closed:
        pass
    with pytest.raises(ultrastyle.ImageError, match=r"content: cannot read the PIL image \(closed"):
        as_pixels(closed, "content")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(AnimatedImageWarning, match="content: an animation of 2 frames"):
        as_pixels(Image.open(tmp_path / "a.gif"), "content")
    with Image.open(tmp_path / "a.gif") as gif:
        pass
    with pytest.raises(ultrastyle.ImageError, match=r"content: cannot read the PIL image"):
        as_pixels(gif, "content")  # closed: its frame count cannot be read either


def test_on_tile_reports_progress_for_images_of_one_tile_too(installed, small):
    seen: list[tuple[str, int, int]] = []
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5, 4)) as s:
        s.stylize(small["c1"], small["s1"], style_size=64, on_tile=lambda *a: seen.append(a))  # 72x56: one tile per stage
        assert seen == [("stage 5 (one tile)", 1, 1), ("stage 4 (one tile)", 1, 1)]
        seen.clear()
        s.stylize(small["c1"], small["s1"], style_size=64, max_memory=None, on_tile=lambda *a: seen.append(a))
        assert [w for w, _, _ in seen] == ["stage 5 (one tile)", "stage 4 (one tile)"]


def test_a_batch_s_style_errors_name_its_keyword_styles_before_the_model_opens(small, tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "empty"))  # opening the model would mean a download
    monkeypatch.setenv("ULTRASTYLE_MIRROR", "http://127.0.0.1:9/nowhere")
    with pytest.raises(ultrastyle.OptionError, match="no style given: give one style image per mask label") as info:
        ultrastyle.stylize_batch([small["c1"]], None, tmp_path / "out", mask=np.eye(56, 72, dtype=bool))
    assert info.value.option == "styles"
    with pytest.raises(ultrastyle.OptionError, match="give a style image") as info:
        ultrastyle.stylize(small["c1"], None)
    assert info.value.option == "style"
    with pytest.raises(ultrastyle.OptionError, match="all zero"):
        ultrastyle.stylize(small["c1"], mix=[(small["s1"], 0), (small["s2"], 0)])
    with pytest.raises(ultrastyle.OptionError, match="no style given: give a style image") as info:
        ultrastyle.stylize_batch([small["c1"]], None, tmp_path / "out")
    assert info.value.option == "styles"
    with pytest.raises(ultrastyle.OptionError, match="give one style as styles="):
        ultrastyle.stylize_batch([small["c1"]], None, tmp_path / "out", mix=[(small["s1"], 1.0)])


def test_an_on_tile_error_in_a_batch_reaches_the_caller_as_raised(installed, small, tmp_path):
    """A service cancels a batch from its callback: the error it raised comes back, not a failed pair per content."""

    class Cancel(Exception):
        pass

    def cancel(what, done, total):
        raise Cancel(what)

    with ultrastyle.load(levels=(5,), backend="torch") as s:
        with pytest.raises(Cancel):
            s.stylize_batch([small["c1"], small["c2"]], [small["s1"]], tmp_path / "out", style_size=64, on_tile=cancel)
        assert s.stylize(small["c1"], small["s1"], style_size=64).shape[2] == 3  # still usable
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_two_torch_stylizers_closed_in_either_order_give_torch_its_thread_count_back(installed):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        a = ultrastyle.load(levels=(5,), backend="torch", threads=1)
        b = ultrastyle.load(levels=(5,), backend="torch", threads=2)
        assert torch.get_num_threads() == 2  # the process's: the last opened sets it
        a.close()
        b.close()
        assert torch.get_num_threads() == 3  # (each putting back what it found left 1)
    finally:
        torch.set_num_threads(before)


def test_float_samples_a_little_outside_the_unit_range_are_clipped_not_passed_on():
    # The review of this change: the 0.05 slack let 1.04 through as 1.04 (alpha -0.04 too).
    from ultrastyle.io.sources import as_pixels

    rgba = np.full((2, 3, 4), 1.04, np.float32)
    rgba[..., 3] = -0.04
    got = as_pixels(rgba, "content", keep_alpha=True)
    assert got.min() >= 0 and got.max() <= 1 and rgba.max() > 1  # the caller's array is left as given


@pytest.mark.parametrize("role", ["content", "style", "mix", "mask"])
def test_stylize_refuses_an_output_that_would_replace_an_input_before_any_work(installed, small, tmp_path, role, monkeypatch):
    # The batch and the CLI refused this; stylize(output=...) replaced its own content or style without a word.
    import shutil

    files = {k: tmp_path / f"{k}.png" for k in ("c1", "s1", "s2")}
    for k, f in files.items():
        shutil.copy(small[k], f)
    mask = tmp_path / "mask.png"
    Image.new("RGB", (72, 56), (0, 0, 0)).save(mask)
    before = {f: f.read_bytes() for f in [*files.values(), mask]}
    call = {"content": dict(style=files["s1"], output=files["c1"]), "style": dict(style=files["s1"], output=files["s1"]),
            "mix": dict(mix=[(files["s1"], 1), (files["s2"], 1)], output=files["s2"]),
            "mask": dict(style=[files["s1"], files["s2"]], mask=mask, output=mask)}[role]  # fmt: skip
    monkeypatch.setattr(ultrastyle.Stylizer, "_open", lambda self: pytest.fail("the model opened before the output was checked"))
    with pytest.raises(ultrastyle.OptionError, match="is one of the inputs; writing it would replace that image"):
        ultrastyle.stylize(files["c1"], backend="torch", **call)
    with pytest.raises(ultrastyle.OptionError, match="is one of the inputs; writing it would replace that image"):
        ultrastyle.load("cd-wct-16x", backend="torch").stylize(files["c1"], **call)
    assert {f: f.read_bytes() for f in before} == before


def test_stylize_refuses_a_folder_or_a_lying_suffix_as_output_before_any_work(installed, small, tmp_path, monkeypatch):
    monkeypatch.setattr(ultrastyle.Stylizer, "_open", lambda self: pytest.fail("the model opened before the output was checked"))
    with pytest.raises(ultrastyle.OptionError, match="is a folder; give a file name"):
        ultrastyle.stylize(small["c1"], small["s1"], output=tmp_path, backend="torch")
    for name in ("b.webp", "j.bmp", "n.gif"):  # PNG bytes in a .webp: the suffix would lie
        with pytest.raises(ultrastyle.OptionError, match=rf"format 'png' but .*{name} ends in"):
            ultrastyle.stylize(small["c1"], small["s1"], output=tmp_path / name, format="png", backend="torch")
    assert list(tmp_path.iterdir()) == []


def test_a_close_or_another_threads_with_block_ending_waits_for_calls_in_flight(installed, small):
    # One thread's `with s:` ending freed the networks under another thread's call: "call activate() before infer()".
    import threading

    s = ultrastyle.load("cd-wct-16x", backend="torch", levels=5)
    ref = s.stylize(small["c1"], small["s1"], style_size=64, tile=32)
    closed_during: list[bool] = []

    def close_midway(what, done, total):  # a close() while this call runs: deferred until it returns
        s.close()
        closed_during.append(s.runner.is_active)

    got = s.stylize(small["c1"], small["s1"], style_size=64, tile=32, on_tile=close_midway)
    assert closed_during and all(closed_during) and np.array_equal(got, ref)
    assert not s.runner.is_active  # then freed, as asked
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(4):
                with s:
                    assert np.array_equal(s.stylize(small["c1"], small["s1"], style_size=64, tile=32), ref)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not s.runner.is_active


def test_stylize_batch_uses_the_stylizers_style_statistics(installed, small, tmp_path, monkeypatch):
    # The docstring's "statistics are cached per style" held for stylize only: each batch computed them again.
    from ultrastyle.runtime.batch import StyleBook

    computed: list[object] = []
    compute = StyleBook._compute

    def counting(self, src, recolor):
        computed.append(src)
        return compute(self, src, recolor)

    monkeypatch.setattr(StyleBook, "_compute", counting)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=5) as s:
        s.stylize(small["c1"], small["s1"], style_size=64)
        for out in ("a", "b"):
            summary = s.stylize_batch([small["c1"]], [small["s1"]], tmp_path / out, style_size=64)
            assert summary.count("done") == 1
    assert len(computed) == 1, computed


def test_stylize_batch_refuses_a_tensor_rather_than_splitting_it_into_rows(installed, small, tmp_path):
    import torch

    a = np.asarray(Image.open(small["c1"]).convert("RGB"))
    t = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    with pytest.raises(TypeError, match="got a Tensor of 3 dimensions; convert it to a numpy array"):
        ultrastyle.stylize_batch(t, small["s1"], tmp_path / "o", backend="torch")
    with pytest.raises(TypeError, match="content: expected a path, an .H, W, 3. array or a PIL image, got Tensor"):
        ultrastyle.stylize_batch([t], small["s1"], tmp_path / "o", backend="torch")
    assert not (tmp_path / "o").exists()
    from ultrastyle.api import _listed

    class Series:  # as pandas' Series of paths: one dimension, an __array__
        ndim = 1

        def __init__(self, items):
            self.items = items

        def __array__(self, dtype=None):
            return np.array(self.items, dtype=object)

        def __iter__(self):
            return iter(self.items)

    assert _listed(Series([str(small["c1"]), str(small["c2"])])) == [str(small["c1"]), str(small["c2"])]


def test_a_callback_that_cannot_be_called_is_an_option_error_before_any_work(installed, small, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr("ultrastyle.api.load", lambda *a, **k: pytest.fail("the model opened before the callbacks were checked"))
        with pytest.raises(ultrastyle.OptionError, match="expected a function"):
            ultrastyle.stylize(small["c1"], small["s1"], on_tile=5)
        with pytest.raises(ultrastyle.OptionError, match="expected a function"):
            ultrastyle.stylize_batch([small["c1"]], [small["s1"]], tmp_path / "o", on_result="print")
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=5) as s:
        with pytest.raises(ultrastyle.OptionError, match="expected a function") as info:
            s.stylize(small["c1"], small["s1"], on_tile=5)
        assert info.value.option == "on_tile"
        with pytest.raises(ultrastyle.OptionError, match="expected a function") as info:
            s.stylize_batch([small["c1"]], [small["s1"]], tmp_path / "o", on_result="print")
        assert info.value.option == "on_result" and not (tmp_path / "o").exists()


def test_a_float_array_in_range_is_used_as_given_and_nan_is_named(installed, small):
    from ultrastyle.io.sources import as_pixels

    a = np.asarray(Image.open(small["c1"]).convert("RGB"), np.float32) / 255
    assert np.shares_memory(as_pixels(a), a)  # in [0, 1] already: no clipped copy (it made two)
    over = a.copy()
    over[0, 0, 0] = 1.02  # within the slack: clipped, in a copy
    got = as_pixels(over)
    assert got is not over and got.max() == 1.0 and over[0, 0, 0] == np.float32(1.02)
    a[1, 1, 1] = np.nan
    with pytest.raises(ultrastyle.ImageError, match="some are NaN"):
        as_pixels(a)


def test_a_style_that_failed_one_call_is_read_again_by_the_next(installed, small, tmp_path, monkeypatch):
    # Errors are kept per file signature; a chmod fix leaves it as it was, and the Stylizer's book outlives the batch.
    from ultrastyle.io.images import ImageError
    from ultrastyle.runtime.batch import StyleBook

    compute, fails = StyleBook._compute, [1]

    def once_unreadable(self, src, recolor):
        if fails:
            fails.pop()
            raise ImageError(f"{src}: cannot read the file (permission denied)")
        return compute(self, src, recolor)

    monkeypatch.setattr(StyleBook, "_compute", once_unreadable)
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=5) as s:
        assert s.stylize_batch([small["c1"]], [small["s1"]], tmp_path / "a", style_size=64).count("failed") == 1
        assert s.stylize_batch([small["c1"]], [small["s1"]], tmp_path / "b", style_size=64).count("done") == 1


def test_library_warnings_name_the_callers_line_however_deep_the_call(tmp_path):
    import inspect
    import warnings

    from ultrastyle.io.images import AnimatedImageWarning
    from ultrastyle.io.sources import as_pixels, as_source

    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    for call in (as_pixels, as_source):  # two depths into the library: a fixed stacklevel named a library line for one
        with warnings.catch_warnings(record=True) as seen, Image.open(tmp_path / "a.gif") as gif:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            call(gif, "content")
        assert [(w.category, w.filename, w.lineno) for w in seen] == [(AnimatedImageWarning, __file__, line)]


@pytest.mark.parametrize(("array", "advice"), [
    (np.full((4, 4, 3), 200, np.int64), r"got int64; its samples lie in 200..200: convert it with .astype\(np.uint8\)"),
    (np.full((4, 4), 3000, np.int64), r"got int64; its samples lie in 3000..3000: convert it with .astype\(np.uint16\)"),
    (np.full((4, 4), -1, np.int16), r"got int16; its samples lie in -1..-1: scale them to 0..255"),
    (np.zeros((4, 4), bool), r"got bool; a true/false array is a mask: give it as the mask \(mask=\)"),
])  # fmt: skip
def test_integer_and_bool_arrays_are_refused_with_the_conversion_their_range_needs(array, advice):
    from ultrastyle.io.sources import as_pixels

    with pytest.raises(ultrastyle.ImageError, match=r"content: expected uint8, uint16 or float32 in \[0, 1\] samples, " + advice):
        as_pixels(array, "content")


def test_settings_given_at_load_are_every_calls_defaults_and_are_checked_before_the_model_opens(installed, small, monkeypatch, tmp_path):
    import ultrastyle.api

    with ultrastyle.load("cd-wct-16x", backend="torch", levels=[5, 4], alpha=0.3, style_size=64) as s:
        assert s.options().alpha == 0.3 and s.options(alpha=0.9).alpha == 0.9  # a call's own setting wins
        got = s.stylize(small["c1"], small["s1"])
        assert np.array_equal(got, s.stylize(small["c1"], small["s1"], alpha=0.3))
        assert not np.array_equal(got, s.stylize(small["c1"], small["s1"], alpha=0.9))
    with ultrastyle.load("cd-wct-16x", backend="torch", levels=[5], format="jpg", style_size=64) as s:
        s.stylize(small["c1"], small["s1"], output=tmp_path / "result")  # the format given at load, for a name without a suffix
        assert (tmp_path / "result").read_bytes()[:2] == b"\xff\xd8"
        s.stylize(small["c1"], small["s1"], output=tmp_path / "result.png")  # a format's suffix overrides the default
        assert (tmp_path / "result.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(ultrastyle.api, "open_runner", lambda *a, **k: pytest.fail("the model opened before its settings were checked"))
    with pytest.raises(ultrastyle.OptionError, match="did you mean 'alpha'"):
        ultrastyle.load("cd-wct-16x", alpah=0.8)  # a TypeError before
    with pytest.raises(ultrastyle.OptionError, match="max_memory"):
        ultrastyle.load("cd-wct-16x", max_memory="lots")
    with pytest.raises(ultrastyle.OptionError, match="skip_existing: applies to stylize_batch calls"):
        ultrastyle.load("cd-wct-16x", skip_existing=True)
    for keyword, call in (("output", "stylize"), ("output_dir", "stylize_batch"), ("style", "stylize"), ("workers", "ultrastyle.stylize_batch")):
        with pytest.raises(ultrastyle.OptionError, match=rf"{keyword}: is an argument of {call}\(.*not a setting kept for every call"):
            ultrastyle.load("cd-wct-16x", **{keyword: "x"})  # "did you mean 'output_dir'" pointed at another call's keyword
    with pytest.raises(ultrastyle.OptionError, match="did you mean 'backend'"):
        ultrastyle.load("cd-wct-16x", backnd="torch")


def test_tilde_paths_are_the_home_folder_for_inputs_outputs_and_models(installed, small, cd16x_dir, tmp_path, monkeypatch):
    """As a shell expands them: a literal "~" folder in the working directory was made (and invites ``rm -rf ~``)."""
    import shutil

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "in").mkdir(parents=True)
    work.mkdir()
    shutil.copy(small["c1"], home / "in" / "c1.png")
    shutil.copy(small["s1"], home / "in" / "s1.png")
    shutil.copytree(cd16x_dir, home / "model")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    kw = dict(backend="torch", levels=(5,), style_size=64)
    a = ultrastyle.stylize("~/in/c1.png", "~/in/s1.png", model="~/model", output="~/one.png", **kw)
    summary = ultrastyle.stylize_batch("~/in/c*.png", ["~/in/s1.png"], "~/batch", model="~/model", **kw)
    with ultrastyle.load("~/model", backend="torch", levels=(5,)) as s:
        s.stylize_batch(["~/in"], "~/in/s1.png", "~/again", style_size=64)
    assert [r.status for r in summary.results] == ["done"] and list(work.iterdir()) == []
    assert np.array_equal(np.asarray(Image.open(home / "one.png")), a)
    assert np.array_equal(np.asarray(Image.open(home / "batch" / "c1_stylized_s1.png")), a)
    assert sorted(p.name for p in (home / "again").iterdir()) == ["c1_stylized_s1.png", "s1_stylized_s1.png"]


def test_a_close_in_another_thread_never_breaks_a_call_finding_its_style_book(installed, small):
    """The books were cleared under a call finding its own: a KeyError (1.6% of calls at this switch interval), or a crash."""
    import sys
    import threading

    failed: list[BaseException] = []
    done = threading.Event()
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with ultrastyle.load("cd-wct-16x", backend="torch", levels=(5,), progress=False) as s:

            def calls() -> None:
                for _ in range(1500):
                    try:
                        s.stylize(small["c1"].with_name("missing.png"), small["s1"], style_size=32)
                    except ultrastyle.ImageError:
                        pass  # what it should raise: the content is missing
                    except BaseException as exc:  # noqa: BLE001 - what the race raised
                        failed.append(exc)
                done.set()

            caller = threading.Thread(target=calls)
            caller.start()
            while not done.is_set():
                s.close()  # as another thread's with block ending
            caller.join()
    finally:
        sys.setswitchinterval(before)
    assert failed == []


def test_a_graph_deleted_after_the_model_opened_is_said_to_be_gone_not_bad(installed, small, tmp_path):
    bundle = ultrastyle.export_model("cd-wct-16x", tmp_path / "b", stages=5)
    with ultrastyle.load(bundle, levels=(5,), progress=False) as s:
        s.stylize(small["c1"], small["s1"], style_size=32)
    for graph in bundle.path.glob("*.onnx"):  # as `models remove` deletes a bundle under a service holding it open
        graph.unlink()
    with pytest.raises(ultrastyle.RunnerError, match="the graph is gone, deleted after the model was opened") as info:
        s.stylize(small["c1"], small["s1"], style_size=32)  # "export the model again" before: not what happened
    assert "export the model again" not in str(info.value)
