"""`ultrastyle stylize` tiling options and 16-bit I/O end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.runtime.batch import IO_SHARE
from ultrastyle.core.plan import DEFAULT_MAX_MEMORY, ImagePlan, TilingOptions
from ultrastyle.io.images import load_image, read_image


@pytest.fixture(scope="module")
def inputs(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiling_in")
    with Image.open(shared_dir / "images/content/cd_content_in1.jpg") as im:
        im.convert("RGB").resize((150, 97), Image.Resampling.LANCZOS).save(d / "content.png")
        im.convert("RGB").resize((300, 194), Image.Resampling.LANCZOS).save(d / "big.png")
    with Image.open(shared_dir / "images/style/cd_style_in3.jpg") as im:
        im.convert("RGB").resize((96, 80), Image.Resampling.LANCZOS).save(d / "style.png")
    # A 16-bit RGB TIFF with detail below 8-bit resolution.
    a = (np.asarray(Image.open(d / "content.png"), np.float64) * 257).astype(np.uint16)
    a[::2, ::2] += 37  # 37/65535 is well under one 8-bit step
    tifffile.imwrite(d / "deep.tif", a, photometric="rgb")
    return {"content": d / "content.png", "big": d / "big.png", "style": d / "style.png", "deep": d / "deep.tif"}


def _run(args: list[object], cd16x_dir: Path):
    return CliRunner().invoke(app, ["stylize", *map(str, args), "--model", str(cd16x_dir), "--style-size", "96"])


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[tuple[TilingOptions, ImagePlan]]:
    """Every (options, plan) the batch made for a content, in order: which tiles each run really had.

    A style's statistics are planned too (`StyleBook`, where its canvas goes), without ``masked``: those are left out.
    """
    import ultrastyle.runtime.batch as batch

    made: list[tuple[TilingOptions, ImagePlan]] = []
    real = batch.plan_image_for

    def spy(model, height, width, levels, options, **kw):
        plan = real(model, height, width, levels, options, **kw)
        if "masked" in kw:  # `stylize_content`'s
            made.append((options, plan))
        return plan

    monkeypatch.setattr(batch, "plan_image_for", spy)
    return made


def _tiles(plan: ImagePlan) -> dict[int, tuple[int, int]]:
    """Stage -> (pass-1 tiles, pass-2 tiles)."""
    return {p.stage: (len(p.encode_tiles()), len(p.decode_tiles())) for p in plan.stages}


def _stylized(folder: Path, name: str = "content_stylized_style.png") -> np.ndarray:
    return np.asarray(Image.open(folder / name), np.int16)


def test_memory_budget_plans_several_tiles_in_every_stage_and_matches_no_tile(inputs, cd16x_dir, tmp_path, plans):
    # 300x194 with a 32 MB budget (24 MB for the tiles, a quarter for the images being read and written):
    # every stage of the 5-stage cascade is cut into several tiles
    # (stage 5, halo 80 px, into 20), so the exact-halo tiling itself is compared with the whole image.
    # (At 150x97 no budget the planner accepts gives more than one tile in stage 5: its area fits.)
    for name, extra in (("budget", ["--max-memory", "32MB"]), ("whole", ["--no-tile"])):
        r = _run([inputs["big"], "--style", inputs["style"], "-o", tmp_path / name, *extra], cd16x_dir)
        assert r.exit_code == 0, r.output
    (_, budget), (_, whole_plan) = plans
    tiles = _tiles(budget)
    assert sorted(tiles) == [1, 2, 3, 4, 5]
    assert all(enc > 1 and dec > 1 for enc, dec in tiles.values()), f"a stage ran as one tile: {tiles}"
    assert all(t == (1, 1) for t in _tiles(whole_plan).values())
    got, whole = _stylized(tmp_path / "budget", "big_stylized_style.png"), _stylized(tmp_path / "whole", "big_stylized_style.png")
    assert got.shape == whole.shape == (194, 300, 3)
    assert np.abs(got - whole).max() <= 1


def test_fixed_tile_size_cuts_every_stage_and_matches_no_tile(inputs, cd16x_dir, tmp_path, plans):
    for name, extra in (("tiled", ["--tile", "40"]), ("whole", ["--no-tile"])):
        r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path / name, *extra], cd16x_dir)
        assert r.exit_code == 0, r.output
    tiles = _tiles(plans[0][1])
    assert all(enc > 1 and dec > 1 for enc, dec in tiles.values()), f"a stage ran as one tile: {tiles}"
    got, whole = _stylized(tmp_path / "tiled"), _stylized(tmp_path / "whole")
    assert got.shape == whole.shape == (97, 150, 3)
    assert np.abs(got - whole).max() <= 1


@pytest.mark.parametrize("flag, value", [("--tile", "40"), ("--tile", "auto"), ("--max-memory", "512MB"), ("--halo", "8")])
def test_a_tiling_flag_with_no_tile_is_refused_not_dropped(inputs, cd16x_dir, tmp_path, flag, value):
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path / "x", flag, value, "--no-tile"], cd16x_dir)
    said = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 2 and "give one of them" in said and flag in said, r.output
    assert not (tmp_path / "x").exists()


def test_default_tile_auto_at_the_default_budget_matches_no_tile(inputs, cd16x_dir, tmp_path, plans):
    # No tiling option at all: `--tile auto` and `--max-memory 2GB`, what a user gets.
    for name, extra in (("default", []), ("whole", ["--no-tile"])):
        r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path / name, *extra], cd16x_dir)
        assert r.exit_code == 0, r.output
    (options, default), _ = plans
    # The tiles get three quarters of the 2 GB default; a quarter is for the images being read and written.
    assert options.tile is None and options.max_memory == DEFAULT_MAX_MEMORY - int(DEFAULT_MAX_MEMORY * IO_SHARE)
    # A 150x97 image fits the default budget: the default runs each stage as one whole-image tile.
    assert all(t == (1, 1) for t in _tiles(default).values())
    got, whole = _stylized(tmp_path / "default"), _stylized(tmp_path / "whole")
    assert got.shape == whole.shape == (97, 150, 3)
    assert np.abs(got - whole).max() <= 1


@pytest.mark.parametrize(
    "option,value,message",
    [("--tile", "big", "auto"), ("--tile", "0", "positive"), ("--max-memory", "lots", "examples"),
     ("--halo", "wide", "exact"), ("--depth", "12", "16")],  # fmt: skip
)
def test_bad_tiling_options_exit_2_naming_the_option(inputs, cd16x_dir, tmp_path, option, value, message):
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path, option, value], cd16x_dir)
    assert r.exit_code == 2
    assert option in r.output and message in r.output


def test_budget_too_small_is_refused_up_front_with_the_minimum(inputs, cd16x_dir, tmp_path):
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path, "--max-memory", "1MB"], cd16x_dir)
    assert r.exit_code == 2
    assert "at least" in r.output and "--max-memory" in r.output
    assert not list(tmp_path.glob("*.png"))


def test_sixteen_bit_tiff_input_keeps_its_precision(inputs):
    a = read_image(inputs["deep"])
    assert a.dtype == np.uint16
    t = load_image(inputs["deep"])
    # the +37 detail survives: it would vanish through 8 bits
    step = (t[:, 0, 0] - t[:, 0, 1]).abs().max().item()
    expected = np.abs(a[0, 0].astype(int) - a[0, 1].astype(int)).max() / 65535
    assert abs(step - expected) < 1e-6


@pytest.mark.parametrize("fmt", ["tiff", "png"])
def test_depth_16_writes_16_bit_files_from_16_bit_input(inputs, cd16x_dir, tmp_path, fmt):
    r = _run([inputs["deep"], "--style", inputs["style"], "-o", tmp_path, "--format", fmt, "--depth", "16",
              "--alpha", "0", "--levels", "1"], cd16x_dir)  # fmt: skip
    assert r.exit_code == 0, r.output
    out = read_image(tmp_path / f"deep_stylized_style.{fmt}")
    assert out.dtype == np.uint16 and out.shape == (97, 150, 3)
    # Not a widened 8-bit image: most values are not multiples of 257.
    assert (out % 257 != 0).mean() > 0.5


def test_depth_16_with_jpeg_is_refused(inputs, cd16x_dir, tmp_path):
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path, "--format", "jpg", "--depth", "16"], cd16x_dir)
    assert r.exit_code == 2 and "--depth" in r.output


def test_disk_canvas_via_scratch_leaves_no_files(inputs, cd16x_dir, tmp_path, monkeypatch):
    # A tiny budget sends every canvas to the scratch folder; results still match.
    import ultrastyle.core.canvas as canvas_mod

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    made: list[Path] = []
    real = canvas_mod.tempfile.TemporaryFile

    def spy(*a, **kw):
        if str(kw.get("prefix", "")).startswith("ultrastyle-canvas-"):
            made.append(Path(kw["dir"]))
        return real(*a, **kw)

    monkeypatch.setattr(canvas_mod.tempfile, "TemporaryFile", spy)
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path / "a", "--max-memory", "3MB",
              "--tile", "32", "--scratch", scratch], cd16x_dir)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert made and all(d == scratch for d in made)  # the canvases really were on disk
    assert list(scratch.iterdir()) == []
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path / "b", "--no-tile"], cd16x_dir)
    a = np.asarray(Image.open(tmp_path / "a/content_stylized_style.png"), np.int16)
    b = np.asarray(Image.open(tmp_path / "b/content_stylized_style.png"), np.int16)
    assert np.abs(a - b).max() <= 1


def test_tiled_batch_frees_the_decoded_content_before_the_stages_run(inputs, cd16x_dir, tmp_path, monkeypatch):
    """At 100 MP the decoded uint8 image is 300 MB: only its canvas may survive into the tile passes."""
    import gc
    import weakref

    import ultrastyle.runtime.batch as batch
    import ultrastyle.runtime.decode as reading

    decoded: list[weakref.ref] = []
    alive_during_stages: list[bool] = []
    real_load, real_tiled = reading.load_content, batch.stylize_tiled

    def load(path, options):
        pixels, original = real_load(path, options)
        pixels = np.array(pixels)  # an array of our own, so the weak reference tracks exactly it
        decoded.append(weakref.ref(pixels))
        return pixels, original

    def tiled(*args, **kwargs):
        gc.collect()
        alive_during_stages.append(decoded[-1]() is not None)
        return real_tiled(*args, **kwargs)

    monkeypatch.setattr(reading, "load_content", load)
    monkeypatch.setattr(batch, "stylize_tiled", tiled)
    r = _run([inputs["content"], "--style", inputs["style"], "-o", tmp_path, "--tile", "48"], cd16x_dir)
    assert r.exit_code == 0, r.output
    assert alive_during_stages == [False]


def test_the_tile_line_counts_tiles_and_the_batch_line_megapixels():
    from rich.progress import Progress

    from ultrastyle.cli.stylize import MegapixelColumn

    p = Progress()
    p.add_task("", total=40.0, completed=32.0)
    p.add_task("", total=9, completed=3, unit="tiles")
    p.add_task("", total=None, completed=1.5)
    p.add_task("", total=0.05, completed=0.02)
    assert [str(MegapixelColumn().render(t)) for t in p.tasks] == ["32.0/40.0 MP", "3/9 tiles", "1.5/? MP", "0.02/0.05 MP"]


@pytest.mark.parametrize("width", [40, 60, 70, 80, 200])
def test_the_bar_keeps_its_counts_and_times_whole_and_cuts_the_name_to_one_line(width):
    """A review: at 80 columns a long output name wrapped every refresh onto two lines, and at 40 hid the counts."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from ultrastyle.cli.stylize import _bar_columns

    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    p = Progress(*_bar_columns(width), console=console, disable=True)
    p.add_task("cd_content_in1_stylized_gcompris_details_Gogh4_background.png", total=12345.6, completed=12344.4)
    p.add_task("  stage 5 decode", total=96, completed=7, unit="tiles")
    p.tasks[0].start_time = p.get_time() - 11 * 3600  # 11 hours in: the elapsed time takes 8 columns
    console.print(p.make_tasks_table(p.tasks))
    rows = out.getvalue().splitlines()
    assert len(rows) == 2 and all(len(r) <= width for r in rows), rows
    assert "12344.4/12345.6 MP 11:00:00" in rows[0] and "7/96 tiles" in rows[1] and "…" not in rows[0][:width - 12], rows
    assert ("cd_content" in rows[0]) == (width >= 70), rows  # the name where there is room for some of it
    assert ("Gogh4_background.png" in rows[0]) == (width >= 120), rows


def test_a_log_gets_a_line_per_finished_pair_not_a_bar(tmp_path, cd16x_dir, monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # what would make rich take the log for a terminal
        monkeypatch.delenv(name, raising=False)
    for i, size in enumerate([(200, 150), (100, 100)]):
        Image.fromarray(np.full((*size[::-1], 3), 60 * i + 40, np.uint8)).save(tmp_path / f"c{i}.png")
    r = _run([tmp_path / "c0.png", tmp_path / "c1.png", "--style", tmp_path / "c0.png", "-o", tmp_path / "out"], cd16x_dir)
    assert r.exit_code == 0, r.output
    lines = [x.split(" in ")[0] for x in r.output.splitlines() if x.startswith("[")]
    assert lines == ["[1/2] c0_stylized_c0.png done; 0.03/0.04 MP", "[2/2] c1_stylized_c0.png done; 0.04/0.04 MP"], r.output
    assert "━" not in r.output  # no bar drawn into the log
    r = _run([tmp_path / "c0.png", "--style", tmp_path / "c0.png", "-o", tmp_path / "quiet", "-q"], cd16x_dir)
    assert r.exit_code == 0 and r.stderr == "" and r.stdout.startswith("1 done, 0 skipped, 0 failed of 1 pairs"), r.output
