"""`ultrastyle stylize` end to end with the real CD-WCT-16x weights, on tiny images.

Contents are 48x40 and 45x37, styles 64x64 (always with --style-size 64), so a
pair takes a few tens of milliseconds on a CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner, Result

from ultrastyle.cli.main import app
from ultrastyle.core.padding import pad_to_grid
from ultrastyle.core.styles import identity_map
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.io.constants import format_name
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models import zoo
from ultrastyle.models.pretrained import DEFAULT_MODEL, load_model
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, stylize, style_statistics

SIZES = {"c1": (48, 40), "c2": (45, 37)}  # (width, height); c2 is odd on both sides


@pytest.fixture(scope="module")
def images(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny copies of shared photos and paintings (made in a temp folder, never in the repo)."""
    d = tmp_path_factory.mktemp("stylize_in")
    src = shared_dir / "images"
    out: dict[str, Path] = {}
    for key, name in (("c1", "content/cd_content_in2.jpg"), ("c2", "content/cd_content_in4.jpg")):
        with Image.open(src / name) as im:
            im.convert("RGB").resize(SIZES[key], Image.Resampling.LANCZOS).save(d / f"{key}.png")
        out[key] = d / f"{key}.png"
    for key, name in (("s1", "style/cd_style_in2.jpg"), ("s2", "style/cd_style_in4.jpg")):
        with Image.open(src / name) as im:
            im.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS).save(d / f"{key}.png")
        out[key] = d / f"{key}.png"
    return out


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner: CliRunner, cd16x_dir: Path):  # noqa: ANN201
    """Run `ultrastyle stylize ARGS --model <cd16x> --style-size 64`."""

    def run(*args: object, model: bool = True) -> Result:
        argv = ["stylize", *map(str, args), "--style-size", "64"]
        if model:
            argv += ["--model", str(cd16x_dir)]
        return runner.invoke(app, argv)

    return run


def _summary(r: Result) -> tuple[int, int, int, int]:
    m = re.search(r"(\d+) done, (\d+) skipped, (\d+) failed of (\d+) pairs", r.stdout)
    assert m, f"no summary line in stdout: {r.stdout!r}"
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def _partials(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if "partial" in p.name] if d.exists() else []


def _size(p: Path) -> tuple[int, int]:
    with Image.open(p) as im:
        return im.size


def _fmt(p: Path) -> str:
    with Image.open(p) as im:
        return im.format


def _error_lines(r: Result) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


# ---------------------------------------------------------------- good batches


def test_two_contents_by_two_styles_make_four_outputs_of_input_size(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(images["c1"], images["c2"], "--style", images["s1"], "--style", images["s2"], "-o", out)
    assert r.exit_code == 0, r.output
    assert _summary(r) == (4, 0, 0, 4)
    assert "4 done" in r.stdout and " s (" in r.stdout and " MP)" in r.stdout
    assert "s/MP" not in r.stdout  # under 1 MP done the rate would mostly be fixed costs
    names = sorted(p.name for p in out.iterdir())
    assert names == ["c1_stylized_s1.png", "c1_stylized_s2.png", "c2_stylized_s1.png", "c2_stylized_s2.png"]
    for c in ("c1", "c2"):
        for s in ("s1", "s2"):
            p = out / f"{c}_stylized_{s}.png"
            assert _fmt(p) == "PNG"
            assert _size(p) == SIZES[c]  # the output keeps the input size, odd sizes included
    # Different styles really give different pictures.
    a = np.asarray(Image.open(out / "c1_stylized_s1.png"), dtype=np.int16)
    b = np.asarray(Image.open(out / "c1_stylized_s2.png"), dtype=np.int16)
    assert np.abs(a - b).mean() > 5
    assert _error_lines(r) == []


def test_positional_style_is_the_last_argument(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(images["c1"], images["c2"], images["s2"], "-o", out)
    assert r.exit_code == 0, r.output
    assert _summary(r) == (2, 0, 0, 2)
    assert sorted(p.name for p in out.iterdir()) == ["c1_stylized_s2.png", "c2_stylized_s2.png"]


def test_positional_form_needs_at_least_two_arguments(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(images["c1"], "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "style" in r.output
    assert not (tmp_path / "out").exists()


def test_content_folder_and_glob_inputs(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    folder = images["c1"].parent  # holds c1, c2, s1, s2
    out = tmp_path / "out"
    r = invoke(folder / "c*.png", "--style", folder / "s1.png", "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["c1_stylized_s1.png", "c2_stylized_s1.png"]


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("tiff", "TIFF"), ("png", "PNG"), ("jpeg", "JPEG"), ("TIF", "TIFF")])
def test_format_option_writes_that_format(invoke, images: dict[str, Path], tmp_path: Path, fmt: str, pil_format: str) -> None:
    out = tmp_path / "out"
    r = invoke(images["c2"], "--style", images["s1"], "-o", out, "--format", fmt)
    assert r.exit_code == 0, r.output
    p = out / f"c2_stylized_s1.{format_name(fmt)}"  # the aliases the Python API takes: jpeg -> .jpg, tif -> .tiff
    assert [q.name for q in out.iterdir()] == [p.name]
    assert _fmt(p) == pil_format and _size(p) == SIZES["c2"]


def test_skip_existing_rerun_skips_all_and_leaves_files_untouched(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = (images["c1"], images["c2"], "--style", images["s1"], "--style", images["s2"], "-o", out)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert len(before) == 4
    r = invoke(*args, "--skip-existing")
    assert r.exit_code == 0, r.output
    assert _summary(r) == (0, 4, 0, 4)
    assert "4 skipped" in r.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_skip_existing_only_runs_missing_pairs(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = (images["c1"], images["c2"], "--style", images["s1"], "-o", out)
    assert invoke(*args).exit_code == 0
    (out / "c2_stylized_s1.png").unlink()
    r = invoke(*args, "--skip-existing")
    assert r.exit_code == 0, r.output
    assert _summary(r) == (1, 1, 0, 2)
    assert (out / "c2_stylized_s1.png").is_file()


def test_without_skip_existing_outputs_are_rewritten(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = (images["c1"], "--style", images["s1"], "-o", out)
    assert invoke(*args).exit_code == 0
    (out / "c1_stylized_s1.png").write_bytes(b"stale")
    r = invoke(*args)
    assert r.exit_code == 0 and _summary(r) == (1, 0, 0, 1)
    assert _fmt(out / "c1_stylized_s1.png") == "PNG"


def test_content_size_resizes_long_side(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = invoke(images["c1"], "--style", images["s1"], "-o", out, "--content-size", "24")
    assert r.exit_code == 0, r.output
    assert _size(out / "c1_stylized_s1.png") == (24, 20)


def test_contents_in_every_mode_and_exif_rotation_are_stylized(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    with Image.open(images["c1"]) as im:
        rgb = im.convert("RGB")
    rgb.convert("L").save(src / "grey.png")
    rgb.convert("LA").save(src / "grey_alpha.png")
    rgb.convert("P").save(src / "palette.png")
    rgb.convert("RGBA").save(src / "rgba.png")
    rgb.convert("CMYK").save(src / "cmyk.tiff")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(src / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(src / "rotated.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    r = invoke(src, "--style", images["s1"], "-o", out)
    assert r.exit_code == 0, r.output
    assert _summary(r) == (7, 0, 0, 7)
    for stem in ("grey", "grey_alpha", "palette", "rgba", "cmyk", "grey16"):
        assert _size(out / f"{stem}_stylized_s1.png") == (48, 40), stem
    assert _size(out / "rotated_stylized_s1.png") == (40, 48)  # EXIF rotation applied


def _u8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float -> (H, W, 3) int16, rounded as the writer rounds."""
    return (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy().astype(np.int16)


def test_method_adain_is_the_adain_cascade_and_differs_from_wct(invoke, images: dict[str, Path], tmp_path: Path, cd16x_dir: Path) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "wct")
    assert r.exit_code == 0, r.output
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "adain", "--method", "adain")
    assert r.exit_code == 0, r.output
    p = tmp_path / "adain" / "c1_stylized_s1.png"
    assert _size(p) == SIZES["c1"]
    a = np.asarray(Image.open(p), dtype=np.int16)
    w = np.asarray(Image.open(tmp_path / "wct" / "c1_stylized_s1.png"), dtype=np.int16)
    model = load_model(cd16x_dir)
    stats = style_statistics(model, resize_long_side(load_image(images["s1"]), 64), DEFAULT_LEVELS)
    lib = _u8(stylize(model, load_image(images["c1"]), stats, method="adain"))
    assert np.abs(a - lib).max() <= 1  # the library's AdaIN cascade
    assert np.abs(a - w).mean() > 1  # and not WCT's


def test_alpha_0_gives_the_reconstructions_of_exactly_the_chosen_levels(
    invoke, images: dict[str, Path], tmp_path: Path, cd16x_dir: Path
) -> None:
    # At alpha 0 the transform is the identity: the output is each chosen stage's
    # decoder(encoder(x)) in turn, here stage 4 then stage 2 (no clamping between stages).
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path, "--levels", "4,2", "--alpha", "0")
    assert r.exit_code == 0, r.output
    got = np.asarray(Image.open(tmp_path / "c1_stylized_s1.png"), dtype=np.int16)
    model = load_model(cd16x_dir)
    x = load_image(images["c1"])[None]
    with torch.inference_mode():
        for k in (4, 2):
            f = model.encode(k, pad_to_grid(x, model.arch.grid(k)))
            x = model.decode(k, f, *identity_map(f.shape[1]))[..., : x.shape[-2], : x.shape[-1]]
    assert got.shape == (40, 48, 3)
    assert np.abs(got - _u8(x[0])).max() <= 1
    content = np.asarray(Image.open(images["c1"]).convert("RGB"), dtype=np.int16)
    assert np.abs(got - content).mean() > 1  # the reconstruction is not the content itself: the stages ran


def _style_distance(model, image: torch.Tensor, style: torch.Tensor, stage: int) -> float:
    """|mean - mean_s| + |cov - cov_s|_F of relu{stage}_1 features: how far ``image`` is from the style's statistics."""
    def stats(img: torch.Tensor) -> FeatureStats:
        with torch.inference_mode():
            return FeatureStats.of(model.encode(stage, pad_to_grid(img[None], model.arch.grid(stage))))

    a, b = stats(image), stats(style)
    return float((a.mean - b.mean).norm() + (a.covariance() - b.covariance()).norm())


def test_alpha_moves_the_output_toward_the_style(invoke, images: dict[str, Path], tmp_path: Path, cd16x_dir: Path) -> None:
    model = load_model(cd16x_dir)
    style = resize_long_side(load_image(images["s1"]), 64)
    distances: dict[int, list[float]] = {1: [], 3: []}
    for alpha in ("0", "0.5", "1"):
        r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / alpha, "--alpha", alpha)
        assert r.exit_code == 0, (alpha, r.output)
        out = load_image(tmp_path / alpha / "c1_stylized_s1.png")
        for k in distances:
            distances[k].append(_style_distance(model, out, style, k))
    # Measured on this pair: relu1_1 651 -> 318 -> 197, relu3_1 1673 -> 1121 -> 847.
    for k, d in distances.items():
        assert d[0] > d[1] > d[2], (k, d)
        assert d[2] < 0.8 * d[0], (k, d)


# ---------------------------------------------------------------- the CLI is a thin layer


def test_cli_output_equals_library_cascade(invoke, images: dict[str, Path], tmp_path: Path, cd16x_dir: Path) -> None:
    out = tmp_path / "out"
    r = invoke(images["c2"], "--style", images["s2"], "-o", out)
    assert r.exit_code == 0, r.output
    cli = np.asarray(Image.open(out / "c2_stylized_s2.png").convert("RGB"), dtype=np.int16)

    model = load_model(cd16x_dir)
    style = resize_long_side(load_image(images["s2"]), 64)
    stats = style_statistics(model, style, DEFAULT_LEVELS)
    lib_u8 = _u8(stylize(model, load_image(images["c2"]), stats))

    assert cli.shape == lib_u8.shape == (37, 45, 3)
    assert np.abs(cli - lib_u8).max() <= 1
    # and it is a stylization, not a copy of the content
    content = np.asarray(Image.open(images["c2"]).convert("RGB"), dtype=np.int16)
    assert np.abs(cli - content).mean() > 5


# ---------------------------------------------------------------- bad inputs


def _bad_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), "RGB").save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "full.jpg").unlink()
    (d / "text.jpg").write_text("not an image at all\n")
    (d / "empty.png").write_bytes(b"")
    return {
        "missing": d / "missing.jpg",
        "truncated": d / "truncated.jpg",
        "text": d / "text.jpg",
        "empty": d / "empty.png",
    }


def test_bad_contents_are_reported_once_each_and_good_pairs_still_run(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    r = invoke(images["c1"], bad["missing"], bad["truncated"], images["c2"], bad["text"], bad["empty"], "--style", images["s1"], "-o", out)
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Traceback" not in r.output
    assert _summary(r) == (2, 0, 4, 6)
    causes = {"missing": "no such file", "truncated": "truncated", "text": "not an image", "empty": "empty"}
    errors = _error_lines(r)
    assert len(errors) == 4, errors
    for key, path in bad.items():
        assert r.output.count(str(path)) == 1, (key, r.output)
        line = next(ln for ln in errors if str(path) in ln)
        assert causes[key] in line.lower(), line
    assert sorted(p.name for p in out.iterdir()) == ["c1_stylized_s1.png", "c2_stylized_s1.png"]
    assert _size(out / "c2_stylized_s1.png") == SIZES["c2"]
    assert _partials(out) == [] and _partials(tmp_path) == []


def test_bad_content_with_two_styles_is_reported_on_one_line(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path / "in")
    r = invoke(images["c1"], bad["text"], "--style", images["s1"], "--style", images["s2"], "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert _summary(r) == (2, 0, 2, 4)
    assert r.output.count(str(bad["text"])) == 1, r.stderr


def test_bad_style_fails_its_pairs_and_good_style_pairs_succeed(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    bad = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    r = invoke(images["c1"], images["c2"], "--style", bad["truncated"], "--style", images["s2"], "-o", out)
    assert r.exit_code == 1, r.output
    assert _summary(r) == (2, 0, 2, 4)
    errors = _error_lines(r)
    assert errors and all(str(bad["truncated"]) in ln and "style" in ln for ln in errors), errors
    assert sorted(p.name for p in out.iterdir()) == ["c1_stylized_s2.png", "c2_stylized_s2.png"]
    assert _partials(out) == []


def test_a_missing_file_every_pair_needs_is_refused_before_the_model_opens(invoke, images: dict[str, Path], tmp_path: Path,
                                                                          monkeypatch) -> None:  # fmt: skip
    """As optimize refuses its style: exit 2, one line, no model opened (a download, an export) for outputs that all fail."""
    import ultrastyle.api

    missing = tmp_path / "nostyle.png"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ultrastyle.api.Stylizer, "__init__", lambda *a, **k: pytest.fail("the model was opened"))
        for args, role in (((images["c1"], "--style", missing), "style"), ((missing, tmp_path / "no2.png", "--style", images["s1"]), "content"),
                           ((images["c1"], "--style", images["s1"], "--style", missing, "--mask", images["c1"]), "style")):  # fmt: skip
            r = invoke(*args, "-o", tmp_path / "out")
            assert r.exit_code == 2, r.output
            assert _error_lines(r) == [f"error: {missing}: no such {role} image file{' (and 1 more)' if role == 'content' else ''}; "
                                       "every output would fail on it"]  # fmt: skip
    assert not (tmp_path / "out").exists()
    r = invoke(images["c1"], "--style", missing, "--style", images["s1"], "-o", tmp_path / "out")  # the other style's pair still runs
    assert r.exit_code == 1
    errors = _error_lines(r)
    assert len(errors) == 1 and str(missing) in errors[0] and "no such file" in errors[0]
    assert _summary(r) == (1, 0, 1, 2)


def test_a_style_every_pair_needs_that_is_no_image_or_too_large_is_refused_before_the_model_opens(
        invoke, images: dict[str, Path], tmp_path: Path) -> None:  # fmt: skip
    """A review: a text file given as the only style opened the model and failed every pair (exit 1), where optimize refuses it."""
    import ultrastyle.api

    bad = _bad_inputs(tmp_path / "in")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ultrastyle.api.Stylizer, "__init__", lambda *a, **k: pytest.fail("the model was opened"))
        for args, said in (((bad["text"],), f"style {bad['text']}: not an image file"), ((bad["empty"],), f"style {bad['empty']}: "),
                           ((images["s1"], "--max-pixels", "100"), f"style {images['s1']}: "),
                           ((images["s1"], "--style", bad["text"], "--mask", images["c1"]), f"style {bad['text']}: not an image file")):  # fmt: skip
            r = invoke(images["c1"], "--style", *args, "-o", tmp_path / "out")
            assert r.exit_code == 2, r.output
            errors = _error_lines(r)
            assert len(errors) == 1 and errors[0].startswith(f"error: {said}") and errors[0].endswith("every output would fail on it"), errors
            assert ("above the limit of 100 pixels (--max-pixels)" in errors[0]) == ("--max-pixels" in args), errors
    assert not (tmp_path / "out").exists()
    r = invoke(images["c1"], "--style", bad["text"], "--style", images["s1"], "-o", tmp_path / "out")  # the other style's pair still runs
    assert r.exit_code == 1 and _summary(r) == (1, 0, 1, 2), r.output
    assert r.stdout.rstrip().endswith(f"; outputs in {tmp_path / 'out'}"), r.stdout
    r = invoke(bad["truncated"], "--style", images["s1"], "-o", tmp_path / "out2")  # a good header: it fails in its run
    assert r.exit_code == 1 and r.stdout.rstrip().endswith("; no output was written"), r.stdout  # not "outputs in" a folder never made


def test_an_output_dir_under_a_file_is_refused_before_any_work_naming_it(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    out = blocker / "out"
    r = invoke(images["c1"], "--style", images["s1"], "-o", out)
    assert r.exit_code == 2, r.output  # a bad argument, found before the model opens (it used to fail every pair at its write)
    text = " ".join(r.output.replace("│", " ").split())
    assert "Traceback" not in r.output and f"{out} cannot be made: {blocker} is a file" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "a regular file"


def test_max_pixels_option_refuses_big_content(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with Image.open(images["c1"]) as im:
        im.resize((80, 64)).save(big)  # 5120 px: refused; c1 (1920 px) and the styles (4096 px) are allowed
    r = invoke(big, images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--max-pixels", "5000")
    assert r.exit_code == 1, r.output
    assert _summary(r) == (1, 0, 1, 2)
    errors = _error_lines(r)
    assert len(errors) == 1 and str(big) in errors[0] and "--max-pixels" in errors[0], errors
    assert (tmp_path / "out" / "c1_stylized_s1.png").is_file()
    assert not (tmp_path / "out" / "big_stylized_s1.png").exists()


def test_no_content_found_exits_2(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = invoke(tmp_path / "empty", "--style", images["s1"], "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "no content images" in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad options and models


@pytest.mark.parametrize(
    ("option", "value"),
    [("--levels", "9"), ("--levels", "5,x"), ("--alpha", "2"), ("--alpha", "-0.1"), ("--method", "gatys"), ("--format", "bmp")],
)
def test_invalid_option_values_exit_2(invoke, images: dict[str, Path], tmp_path: Path, option: str, value: str) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", option, value)
    assert r.exit_code == 2, r.output
    assert option in r.output
    assert not (tmp_path / "out").exists()


def test_unknown_model_name_exits_2_listing_known_models(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--model", "no-such-model", model=False)
    assert r.exit_code == 2, (r.output, r.exception)
    assert "no-such-model" in r.stderr
    assert all(name in r.stderr for name in zoo.entries())


def test_model_folder_without_weights_exits_2(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "weights"
    empty.mkdir()
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--model", empty, model=False)
    assert r.exit_code == 2, r.output
    assert str(empty) in r.stderr and "5SE.pth" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_default_model_offline_says_how_to_import(
    invoke, images: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, closed_port_url: str
) -> None:
    monkeypatch.setenv("ULTRASTYLE_MIRROR", closed_port_url)
    assert not zoo.is_installed(DEFAULT_MODEL)  # ULTRASTYLE_HOME is a fresh temp dir
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", model=False)
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "ultrastyle models import" in r.stderr
    assert closed_port_url in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    assert _partials(zoo.home_dir()) == []


def test_an_output_name_too_long_for_the_file_system_is_refused_before_any_work(invoke, images, tmp_path) -> None:
    # 140 + 120 characters: "File name too long" once came after the compute, exit 1.
    content, style = tmp_path / f"{'c' * 140}.png", tmp_path / f"{'s' * 120}.png"
    content.write_bytes(images["c1"].read_bytes())
    style.write_bytes(images["s1"].read_bytes())
    r = invoke(content, "--style", style, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "longer than a file name may be (255)" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()
    dzi = tmp_path / f"{'d' * 238}.png"  # NAME_stylized_s.dzi fits 255 bytes; NAME_stylized_s_files, written beside it, does not
    dzi.write_bytes(images["c1"].read_bytes())
    r = invoke(dzi, "--style", images["s1"], "-o", tmp_path / "out", "-f", "dzi")
    assert r.exit_code == 2 and "_stylized_s1_files (256 bytes)" in " ".join(r.output.split()), r.output


def test_two_contents_with_the_same_stem_are_refused_before_any_work(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "c1.png").write_bytes(images["c1"].read_bytes())
    r = invoke(images["c1"], other / "c1.png", "--style", images["s1"], "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "would both write" in r.output and "c1_stylized_s1.png" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, said", [
    (["-f", "jpg", "--png-level", "9"], "--png-level shapes png outputs only; this run writes jpg: left out"),
    (["-f", "png", "--dzi-tiles", "png"], "--dzi-tiles shapes dzi outputs only"),
    (["-f", "png", "--tiff-layout", "pyramid"], "--tiff-layout shapes tiff outputs only"),
])
def test_a_format_flag_the_format_leaves_out_is_said(invoke, images, tmp_path, args, said) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--levels", "5", *args)
    assert r.exit_code == 0, r.output
    assert f"warning: {said}" in " ".join(r.stderr.split()), r.stderr
    quiet = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out2", "--levels", "5", *args[:2])
    assert "warning:" not in quiet.stderr  # the defaults of the other formats' flags say nothing


def test_tiff_compression_shapes_plain_tiffs_too_and_jpeg_makes_a_pyramid(invoke, images, tmp_path) -> None:
    # --tiff-compression was left out of every plain TIFF, and auto is plain for nearly every photo.
    import tifffile

    pages = {}
    for name, args in {"zstd": ["--tiff-compression", "zstd"], "deflate": [], "jpeg": ["--tiff-compression", "jpeg"]}.items():
        r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / name, "--levels", "5", "-f", "tiff", *args)
        assert r.exit_code == 0 and "warning:" not in r.stderr, r.output
        with tifffile.TiffFile(tmp_path / name / "c1_stylized_s1.tiff") as tif:
            pages[name] = (int(tif.pages[0].compression), tif.pages[0].is_tiled)
    assert pages == {"zstd": (50000, False), "deflate": (8, False), "jpeg": (7, True)}  # jpeg: tiles, so auto makes a pyramid
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "no", "-f", "tiff", "--tiff-layout", "plain",
               "--tiff-compression", "jpeg")  # fmt: skip
    assert r.exit_code == 2 and "a plain TIFF takes deflate or zstd" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("flag, names", [("--content-size", "error: {c1}"), ("--style-size", "error: style {s1}")])
def test_a_size_that_would_pass_max_pixels_fails_its_pairs_before_any_read(runner, cd16x_dir, images, tmp_path, flag, names) -> None:
    """An enlargement is bounded as a file's own size is: --style-size 100000 once asked for a 112 GiB scratch canvas."""
    r = runner.invoke(app, ["stylize", str(images["c1"]), "--style", str(images["s1"]), "-o", str(tmp_path / "out"), "--model",
                            str(cd16x_dir), flag, "100000", "--max-pixels", "1000000"])  # fmt: skip
    said = " ".join(r.stderr.split())
    names = names.format(**images)
    assert r.exit_code == 1 and f"{names}: resized to 100000x" in said and f"({flag})" in said and "(--max-pixels)" in said, said
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("where", ["content", "style", "output", "model"])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(runner, images, tmp_path, monkeypatch, where) -> None:
    monkeypatch.chdir(images["c1"].parent)  # "" would be this folder: every image in it, as contents or styles
    args = {"content": ["", "--style", images["s1"], "-o", tmp_path / "out"],
            "style": [images["c1"], "--style", "", "-o", tmp_path / "out"], "output": [images["c1"], "--style", images["s1"], "-o", ""],
            "model": [images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--model", ""]}  # fmt: skip
    r = runner.invoke(app, ["stylize", *map(str, args[where])])  # "no model weights in ." said nothing of the cause
    assert r.exit_code == 2 and "an empty path" in r.output, r.output
    assert {"content": "CONTENT", "style": "--style", "output": "--output", "model": "--model"}[where] in r.output
    assert not (tmp_path / "out").exists() and not list(images["c1"].parent.glob("*_stylized_*"))


def test_one_file_written_two_ways_is_one_content(invoke, images, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(images["c1"].parent)
    r = invoke("c1.png", images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--levels", "5")
    assert r.exit_code == 0, r.output
    assert _summary(r) == (1, 0, 0, 1)


def test_a_rerun_into_the_contents_folder_does_not_stylize_its_own_outputs(invoke, images, tmp_path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "c1.png").write_bytes(images["c1"].read_bytes())
    first = invoke(d, "--style", images["s1"], "-o", d, "--levels", "5")
    assert first.exit_code == 0 and _summary(first) == (1, 0, 0, 1), first.output
    again = invoke(d, "--style", images["s1"], "-o", d, "--levels", "5", "--skip-existing")
    assert again.exit_code == 0 and _summary(again) == (0, 1, 0, 1), again.output  # c1_stylized_s1.png is an output, not a content
    assert "1 of the contents are outputs of this batch" in " ".join(again.stderr.split()) and "c1_stylized_s1.png" in again.stderr
    assert sorted(p.name for p in d.iterdir()) == ["c1.png", "c1_stylized_s1.png"]
    other = invoke(d, "--style", images["s1"], "-o", d, "--levels", "5", "-f", "jpg")  # another format: still an output
    assert other.exit_code == 0 and _summary(other) == (1, 0, 0, 1), other.output
    assert sorted(p.name for p in d.iterdir()) == ["c1.png", "c1_stylized_s1.jpg", "c1_stylized_s1.png"]


def test_masked_outputs_are_named_by_their_mask_so_other_masks_neither_replace_them_nor_the_mask(invoke, images, tmp_path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    labels = np.zeros(SIZES["c1"][::-1], np.uint8)
    labels[:, : SIZES["c1"][0] // 2] = 255
    masks = [d / "c1_stylized_s1+s2.png", d / "right.png"]  # the first: the name c1's masked output took without its mask
    Image.fromarray(labels).save(masks[0])
    Image.fromarray(255 - labels).save(masks[1])
    before = [m.read_bytes() for m in masks]
    for mask in masks:
        r = invoke(images["c1"], "--style", images["s1"], "--style", images["s2"], "--mask", mask, "-o", d, "--skip-existing")
        assert r.exit_code == 0 and "1 done" in r.output, r.output
    assert [m.read_bytes() for m in masks] == before
    assert sorted(p.name for p in d.iterdir()) == ["c1_stylized_s1+s2.png", "c1_stylized_s1+s2_mask-c1_stylized_s1+s2.png",
                                                   "c1_stylized_s1+s2_mask-right.png", "right.png"]  # fmt: skip


# ---------------------------------------------------------------- a user's review: what a newcomer tries


def test_no_readable_content_fails_its_pairs_without_a_traceback(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    r = invoke(tmp_path / "nowhere.jpg", empty, "--style", images["s1"], "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "0.0/? MP" in r.stderr  # the progress bar's total is unknown, not a crash
    assert sorted(_error_lines(r)) == [f"error: {empty}: empty file (0 bytes)", f"error: {tmp_path / 'nowhere.jpg'}: no such file"]
    assert _summary(r) == (0, 0, 2, 2)


def test_an_image_name_given_as_the_output_folder_is_refused(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "result.jpg")
    assert r.exit_code == 2 and "looks like a file name" in r.output and "--format" in r.output
    assert not (tmp_path / "result.jpg").exists()
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):  # refused before the model opens, not 1 after every pair's compute
        r = invoke(images["c1"], "--style", images["s1"], "-o", out)
        assert r.exit_code == 2 and "afile is a file" in " ".join(r.output.replace("│", " ").split()), r.output
        assert "exporting" not in r.output


@pytest.mark.parametrize(("args", "says"), [
    (["--levels", "5,,4"], "comma-separated stage numbers"),
    (["--threads", "99999"], "99999 threads are more than 4 per core"),
])  # fmt: skip
def test_option_typos_are_refused_before_any_work(invoke, images: dict[str, Path], tmp_path: Path, args: list[str], says: str) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", *args)
    assert r.exit_code == 2 and says in " ".join(r.output.replace("│", " ").split()) and not (tmp_path / "out").exists()


def test_the_max_memory_error_names_a_budget_that_works(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--max-memory", "4MiB", "--backend", "torch")
    assert r.exit_code == 2, r.output
    m = re.search(r"give at least (\d+) MiB", re.sub(r"[\s│]+", " ", r.output))  # the message wraps inside a box
    assert m, r.output
    ok = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--max-memory", f"{m.group(1)}MiB", "--backend", "torch")
    assert ok.exit_code == 0 and _summary(ok) == (1, 0, 0, 1), ok.output  # the figure it names is enough
    short = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "o2", "--max-memory", f"{int(m.group(1)) - 1}MiB", "--backend", "torch")
    assert short.exit_code == 2  # and is the least


def test_help_shows_the_model_defaults(runner: CliRunner) -> None:
    out = " ".join(runner.invoke(app, ["stylize", "--help"], env={"COLUMNS": "300"}).output.split())
    assert "(default: the model's, wct for the CD models)" in out and "(default: the model's, 0.6 for the CD models)" in out


def test_small_pixel_limits_read_in_pixels(invoke, images: dict[str, Path], tmp_path: Path) -> None:
    r = invoke(images["c1"], "--style", images["s1"], "-o", tmp_path / "out", "--max-pixels", "100")
    with Image.open(images["s1"]) as im:
        sw, sh = im.size
    assert f"{sw}x{sh} = {sw * sh} pixels is above the limit of 100 pixels" in " ".join(r.output.split())  # not "0 MP ... 0 MP"
    r = invoke(images["c1"], "--style", images["c2"], "-o", tmp_path / "out", "--max-pixels", "1700")  # c2 as the style passes
    w, h = SIZES["c1"]
    assert f"{w}x{h} = {w * h} pixels is above the limit of 1700 pixels" in " ".join(r.output.split())


def test_the_summary_and_errors_are_one_line_each_when_piped(invoke, images, tmp_path) -> None:
    out = tmp_path / ("a_long_output_folder_name_" * 4) / "with_a_sub_folder_for_results"  # past 80 columns: it was wrapped mid-word
    r = invoke(images["c1"], "--style", images["s1"], "-o", out)
    assert r.exit_code == 0, r.output
    assert any(line.endswith(f"; outputs in {out}") for line in r.stdout.splitlines()), r.stdout
    r = invoke(images["c1"], "--style", tmp_path / ("no_such_style_" * 8 + ".jpg"), "--style", images["s2"], "-o", out)  # a pair's error
    assert r.exit_code == 1 and any(line.startswith("error: ") and "no_such_style_.jpg" in line for line in r.output.splitlines()), r.output
    r = invoke(images["c1"], "--style", tmp_path / ("no_such_style_" * 8 + ".jpg"), "-o", out)  # the batch's: before the model opens
    assert r.exit_code == 2 and any(line.startswith("error: ") and "no_such_style_.jpg: no such style" in line
                                    for line in r.output.splitlines()), r.output  # fmt: skip


def test_the_summary_says_where_the_outputs_are_or_that_none_were_written(tmp_path, monkeypatch) -> None:
    """A review: `-o '~/out'` (unexpanded by a shell, expanded by the library) was reported as ./~/out; an all-skipped rerun
    said "no output was written" without the folder that holds them."""
    from ultrastyle.cli.logs import where_outputs

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert where_outputs("~/out", 2, 0) == f"outputs in {tmp_path / 'out'}"
    assert where_outputs("rel", 0, 3) == f"nothing new written; outputs in {tmp_path / 'rel'}"
    assert where_outputs("~/a.png", 1, 0, as_file=True) == str(tmp_path / "a.png")
    assert where_outputs("out", 0, 0) == "no output was written"
