"""Batches in parts (``--shard K/N``, ``shard=``): a job array's machines each make their part of one batch, and the
parts together make every output once, as one run would."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import ultrastyle
from ultrastyle.cli.main import app
from ultrastyle.options import OptionError, shard
from ultrastyle.runtime.pairs import OutputCollisionError, deal


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 12])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_the_parts_of_a_list_are_disjoint_cover_it_and_differ_by_at_most_one(count, parts):
    items = [f"photo{i:02d}.jpg" for i in range(count)]
    dealt = [deal(items, (k, parts)) for k in range(1, parts + 1)]
    assert sorted(x for part in dealt for x in part) == items  # each item in exactly one part
    sizes = [len(part) for part in dealt]
    assert max(sizes) - min(sizes) <= 1
    for part in dealt:  # each part keeps the list's order (a content's pairs stay together)
        assert part == sorted(part)
    assert deal(items, None) == items


@pytest.mark.parametrize(("given", "expected"), [("2/4", (2, 4)), (" 1 / 1 ", (1, 1)), ((3, 8), (3, 8)), ([1, 2], (1, 2)),
                                                 ((np.int64(2), 3), (2, 3)), (None, None)])  # fmt: skip
def test_a_shard_is_k_of_n_counted_from_one(given, expected):
    assert shard("shard", given) == expected


@pytest.mark.parametrize(("given", "said"), [("0/4", "K counts from 1"), ("5/4", "1 <= K <= N"), ("1/0", "1 <= K <= N"),
                                             ("2-4", "expected K/N"), ("a/b", "expected K/N"), (2, "expected K/N or a pair"),
                                             ((1.0, 2), "expected K/N or a pair"), ((True, 2), "expected K/N or a pair")])  # fmt: skip
def test_a_bad_shard_is_one_option_error_saying_what_is_expected(given, said):
    with pytest.raises(OptionError) as info:
        shard("shard", given)
    assert info.value.option == "shard" and said in info.value.message


@pytest.fixture(scope="module")
def photos(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Five tiny contents in a folder and one tiny style."""
    d = tmp_path_factory.mktemp("shard_in")
    (d / "in").mkdir()
    with Image.open(shared_dir / "images/content/cd_content_in2.jpg") as im:
        base = im.convert("RGB").resize((40, 32))
    for i in range(5):
        Image.fromarray(np.roll(np.asarray(base), 7 * i, axis=1)).save(d / "in" / f"p{i}.png")
    with Image.open(shared_dir / "images/style/cd_style_in2.jpg") as im:
        im.convert("RGB").resize((48, 48)).save(d / "style.png")
    return d / "in", d / "style.png"


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_the_cli_parts_of_a_batch_make_each_output_once_as_one_run_does(photos, cd16x_dir, tmp_path, one_thread):
    contents, style = photos
    base = ["stylize", str(contents), "--style", str(style), "--style-size", "48", "--model", str(cd16x_dir), "--levels", "5,4"]
    whole = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    made: dict[int, list[str]] = {}
    for k in (1, 2, 3):
        before = {p.name for p in (tmp_path / "parts").iterdir()} if (tmp_path / "parts").exists() else set()
        r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "parts"), "--shard", f"{k}/3"])
        assert r.exit_code == 0, r.output
        made[k] = sorted({p.name for p in (tmp_path / "parts").iterdir()} - before)
        assert f"part {k}/3: {len(made[k])} contents, {len(made[k])} pairs" in r.output
        assert f"{len(made[k])} done, 0 skipped, 0 failed of {len(made[k])} pairs" in r.stdout
    assert [len(made[k]) for k in (1, 2, 3)] == [2, 2, 1]
    assert made[1] == ["p0_stylized_style.png", "p3_stylized_style.png"]  # round-robin in sorted order
    whole_px, parts_px = _pixels(tmp_path / "whole"), _pixels(tmp_path / "parts")
    assert whole_px.keys() == parts_px.keys()
    for name, px in whole_px.items():
        np.testing.assert_array_equal(parts_px[name], px, err_msg=name)
    empty = CliRunner().invoke(app, ["stylize", str(contents / "p0.png"), "--style", str(style), "-o", str(tmp_path / "none"),
                                     "--shard", "2/2", "--model", str(cd16x_dir)])  # fmt: skip
    assert empty.exit_code == 0 and "part 2/2: none of the 1 contents; nothing to do" in empty.output
    assert not (tmp_path / "none").exists()
    bad = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "bad"), "--shard", "0/3"])
    assert bad.exit_code == 2 and "--shard" in bad.output and "K counts from 1" in bad.output


def test_parts_deal_what_the_whole_batch_plans_whatever_the_other_parts_wrote(photos, cd16x_dir, tmp_path, one_thread):
    """Outputs written into the contents' folder are left out of the contents before dealing, so a part run after another
    deals the same list; and two contents whose outputs clash are refused in every part, not written by two."""
    import shutil

    contents, style = photos
    folder = tmp_path / "both"
    shutil.copytree(contents, folder)
    planned: dict[int, list[str]] = {}
    with ultrastyle.load(cd16x_dir, levels=(5,)) as stylizer:
        for k in (2, 1):  # part 2 first: its outputs are in the folder when part 1 lists it
            with pytest.warns(UserWarning, match="outputs of this batch") if k == 1 else contextlib.nullcontext():
                summary = stylizer.stylize_batch(folder, style, folder, shard=(k, 2), style_size=48,
                                                 on_plan=lambda pairs, k=k: planned.setdefault(k, [p.content.name for p in pairs]))  # fmt: skip
            assert summary.count("done") == len(planned[k])
        assert planned == {1: ["p0.png", "p2.png", "p4.png"], 2: ["p1.png", "p3.png"]}
        assert sorted(p.name for p in folder.iterdir() if "stylized" in p.name) == [f"p{i}_stylized_style.png" for i in range(5)]
        clash = tmp_path / "clash"
        clash.mkdir()
        Image.open(contents / "p0.png").save(clash / "a.png")
        Image.open(contents / "p1.png").save(clash / "a.jpg")
        for k in (1, 2):  # each part alone has one of them: the clash is the whole batch's
            with pytest.raises(OutputCollisionError):
                stylizer.stylize_batch(clash, style, tmp_path / "clash_out", shard=(k, 2), style_size=48)
    assert not (tmp_path / "clash_out").exists()


def test_python_batches_take_a_shard_and_one_image_refuses_it(photos, cd16x_dir, tmp_path, one_thread):
    contents, style = photos
    with ultrastyle.load(cd16x_dir, levels=(5,)) as stylizer:
        summary = stylizer.stylize_batch(contents, style, tmp_path / "out", shard=(2, 2), style_size=48)
        assert [r.pair.output.name for r in summary.results] == ["p1_stylized_style.png", "p3_stylized_style.png"]
        assert summary.planned == 2 and summary.count("done") == 2
        with pytest.raises(OptionError) as info:
            stylizer.stylize(contents / "p0.png", style, shard="1/2")
        assert info.value.option == "shard"
    with pytest.raises(OptionError) as info:  # a batch's choice, not every call's
        ultrastyle.load(cd16x_dir, shard="1/2")
    assert info.value.option == "shard"


def test_optimize_batches_take_a_shard(photos, cd16x_dir, tmp_path, one_thread):
    contents, style = photos
    summary = ultrastyle.optimize_batch(contents, style, tmp_path / "out", model=cd16x_dir, iterations=0, style_size=48,
                                        progress=False, shard="3/3")  # fmt: skip
    assert [r.pair.output.name for r in summary.results] == ["p2_optimized_style.png"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["p2_optimized_style.png"]
    r = CliRunner().invoke(app, ["optimize", str(contents), "--style", str(style), "-o", str(tmp_path / "cli"), "--iterations", "0",
                                 "--style-size", "48", "--model", str(cd16x_dir), "--shard", "1/2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "part 1/2: 3 of the 5 contents" in r.output and "3 done, 0 skipped, 0 failed of 3 images" in r.stdout
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [f"p{i}_optimized_style.png" for i in (0, 2, 4)]
    bad = CliRunner().invoke(app, ["optimize", str(contents), "--style", str(style), "--shard", "4/3"])
    assert bad.exit_code == 2 and "--shard" in bad.output
    with pytest.raises(OptionError) as info:
        ultrastyle.optimize_batch(contents, style, tmp_path / "x", model=cd16x_dir, shard="1 of 2")
    assert info.value.option == "shard"
