"""Zoomable outputs: Deep Zoom pyramids with their viewer page, pyramidal TIFF, written from canvases band by band."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import ultrastyle.io.pyramid as pyramid
from ultrastyle.api import OptionError, make_options
from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.io.images import ImageError, read_image
from ultrastyle.io.pyramid import (
    DZI_OVERLAP, DZI_TILE, PyramidOptions, dzi_levels, save_output, tiff_levels, write_dzi, write_tiff_pyramid,
)  # fmt: skip
from ultrastyle.models.defaults import ModelDefaults
from ultrastyle.models.pretrained import load_model
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.batch import StylizeOptions, run_batch
from ultrastyle.runtime.pairs import StyleSpec, plan_pairs

REPO = Path(__file__).resolve().parents[1]


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _halve(a: np.ndarray) -> np.ndarray:
    """The reference 2 x 2 mean, in float: an odd last row/column repeated, rounded half up."""
    a = np.pad(a.astype(np.float64), ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge")
    m = (a[0::2, 0::2] + a[0::2, 1::2] + a[1::2, 0::2] + a[1::2, 1::2]) / 4
    return np.floor(m + 0.5).astype(np.uint8)


def _assemble(files: Path, level: int, h: int, w: int, fmt: str) -> np.ndarray:
    """A DZI level rebuilt from its tiles (overlaps cut off), checking each tile's size on the way."""
    out = np.zeros((h, w, 3), np.uint8)
    rows, cols = math.ceil(h / DZI_TILE), math.ceil(w / DZI_TILE)
    names = sorted(p.name for p in (files / str(level)).iterdir())
    assert names == sorted(f"{c}_{r}.{fmt}" for c in range(cols) for r in range(rows))
    for r in range(rows):
        for c in range(cols):
            y0, x0 = max(0, r * DZI_TILE - DZI_OVERLAP), max(0, c * DZI_TILE - DZI_OVERLAP)
            y1, x1 = min(h, (r + 1) * DZI_TILE + DZI_OVERLAP), min(w, (c + 1) * DZI_TILE + DZI_OVERLAP)
            with Image.open(files / str(level) / f"{c}_{r}.{fmt}") as im:
                tile = np.asarray(im.convert("RGB"))
            assert tile.shape == (y1 - y0, x1 - x0, 3), (level, c, r)
            out[y0:y1, x0:x1] = tile
    return out


@pytest.mark.parametrize("source", ["array", "canvas"])
def test_dzi_levels_tiles_and_contents(tmp_path: Path, source: str) -> None:
    h, w = 301, 517  # odd, not square, several tiles across
    a = _noise(h, w)
    src = a if source == "array" else canvas_from_array(a)
    write_dzi(src, tmp_path / "x.dzi", PyramidOptions(dzi_tile_format="png"))
    sizes = dzi_levels(h, w)
    assert len(sizes) == math.ceil(math.log2(w)) + 1 == 11 and sizes[0] == (1, 1) and sizes[-1] == (h, w)
    files = tmp_path / "x_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(range(len(sizes)))
    expect = a
    for level in range(len(sizes) - 1, -1, -1):  # every level is the 2 x 2 mean of the one above
        lh, lw = sizes[level]
        np.testing.assert_array_equal(_assemble(files, level, lh, lw, "png"), expect, err_msg=f"level {level}")
        expect = _halve(expect)
    xml = (tmp_path / "x.dzi").read_text()
    assert 'TileSize="254"' in xml and 'Overlap="1"' in xml and 'Format="png"' in xml and f'Width="{w}" Height="{h}"' in xml
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dzi", "x.html", "x_files"]


def test_jpeg_tiles_are_close(tmp_path: Path) -> None:
    y, x = np.mgrid[0:300, 0:400]
    a = np.stack([x * 255 // 400, y * 255 // 300, (x + y) % 256 // 4 + 64], axis=2).astype(np.uint8)  # smooth
    write_dzi(a, tmp_path / "j.dzi")
    got = _assemble(tmp_path / "j_files", 9, 300, 400, "jpg")
    assert np.abs(got.astype(int) - a).mean() < 2.0


def test_the_viewer_page_is_self_contained(tmp_path: Path) -> None:
    write_dzi(_noise(70, 90), tmp_path / "a <b>.dzi")
    page = (tmp_path / "a <b>.html").read_text()
    assert re.search(r"(?i)(https?:)?//[a-z0-9]", page.replace("file://", "")) is None  # no external URL
    assert not re.search(r"(?i)<(script|link|img|iframe)[^>]*\b(src|href)=", page)  # nothing loaded from elsewhere
    assert "<title>a &lt;b&gt;</title>" in page
    config = json.loads(re.search(r"const CONFIG = (\{.*?\});", page).group(1))
    assert config["dzi"] == "a <b>.dzi" and config["files"] == "a <b>_files"
    assert (config["width"], config["height"], config["tileSize"], config["overlap"]) == (90, 70, 254, 1)
    assert config["maxLevel"] == len(dzi_levels(70, 90)) - 1 and config["format"] == "jpg"
    for handler in ("wheel", "pointerdown", "pointermove", "dblclick", "keydown"):
        assert f'"{handler}"' in page


@pytest.mark.parametrize("name, tiles", [("b.DZI", "b.DZI"), ("frame.0001", "frame.0001"), ("my.xml", "my"), ("p.tif.dzi", "p.tif")])
def test_the_tile_folder_is_where_openseadragon_looks_for_it(tmp_path: Path, name: str, tiles: str) -> None:
    """OpenSeadragon takes a lowercase .dzi/.xml off the descriptor's name and adds _files; the page names the file written."""
    write_dzi(_noise(40, 50), tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{tiles}.html", f"{tiles}_files"])
    config = json.loads(re.search(r"const CONFIG = (\{.*?\});", (tmp_path / f"{tiles}.html").read_text()).group(1))
    assert config["dzi"] == name and config["files"] == f"{tiles}_files"


def test_png_tiles_one_pixel_wide_are_written(tmp_path: Path) -> None:
    a = _noise(300, 1)  # imagecodecs' PNG encoder under-sizes its buffer for these
    write_dzi(a, tmp_path / "w.dzi", PyramidOptions(dzi_tile_format="png"))
    np.testing.assert_array_equal(_assemble(tmp_path / "w_files", len(dzi_levels(300, 1)) - 1, 300, 1, "png"), a)


@pytest.mark.parametrize("compression", ["deflate", "zstd"])
def test_tiff_pyramid_levels_halve(tmp_path: Path, compression: str) -> None:
    h, w = 601, 1031
    a = _noise(h, w)
    write_tiff_pyramid(canvas_from_array(a), tmp_path / "p.tif", PyramidOptions(tiff_compression=compression))
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256) and not tif.is_bigtiff
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == tiff_levels(h, w) == [(601, 1031), (301, 516), (151, 258), (76, 129)]
        expect = a
        for lv in levels:
            np.testing.assert_array_equal(lv.asarray(), expect)
            expect = _halve(expect)
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), a)  # what other readers see first: the full level


def test_tiff_pyramid_16_bit_jpeg_and_bigtiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _noise(300, 280).astype(np.uint16) * 257
    write_tiff_pyramid(a, tmp_path / "d.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "d.tif"), a)
    with pytest.raises(ImageError, match=r"d2\.tif: JPEG compression holds 8-bit"):
        write_tiff_pyramid(a, tmp_path / "d2.tif", PyramidOptions(tiff_compression="jpeg"))
    monkeypatch.setattr(pyramid, "_BIGTIFF_AT", 1000)
    monkeypatch.setattr(pyramid, "_SPILL_BYTES", 1000)  # the reduced levels through the scratch file
    b = _noise(600, 700)
    write_tiff_pyramid(b, tmp_path / "big.tif", PyramidOptions(tiff_compression="jpeg"))
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.is_bigtiff and len(tif.series[0].levels) == 3
        assert np.abs(tif.series[0].levels[0].asarray().astype(int) - b).max() > 0  # lossy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif", "d.tif"]


def test_tiff_layout_auto_keeps_small_images_plain(tmp_path: Path) -> None:
    a = _noise(40, 50)
    save_output(a, tmp_path / "s.tiff", "tiff")
    with tifffile.TiffFile(tmp_path / "s.tiff") as tif:
        assert not tif.pages[0].is_tiled and len(tif.series[0].levels) == 1
    assert PyramidOptions().tiff_pyramid(100, 8193) and not PyramidOptions().tiff_pyramid(8192, 8192)
    assert PyramidOptions(tiff_layout="pyramid").tiff_pyramid(10, 10)


def test_options_check_the_new_settings() -> None:
    d = ModelDefaults("wct", (5, 4), 0.6)
    assert make_options(d, format="dzi", dzi_tiles="png").pyramid.dzi_tile_format == "png"
    assert make_options(d, format="tif", tiff_compression="zstd", tiff_layout="pyramid").pyramid == PyramidOptions("pyramid", "zstd")
    for kwargs, option in [({"format": "dzi", "depth": 16}, "depth"), ({"tiff_compression": "lzw"}, "tiff_compression"),
                           ({"tiff_layout": "strips"}, "tiff_layout"), ({"dzi_tiles": "webp"}, "dzi_tiles"),
                           ({"format": "tiff", "depth": 16, "tiff_compression": "jpeg"}, "tiff_compression")]:  # fmt: skip
        with pytest.raises(OptionError) as e:
            make_options(d, **kwargs)
        assert e.value.option == option


# --- through the batch: the canvas goes to the writer --------------------------------------------


@pytest.fixture(scope="module")
def runner(cd16x_dir: Path):
    with TorchRunner(load_model(cd16x_dir, stages=(5, 4))) as r:
        yield r


@pytest.fixture(scope="module")
def inputs(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pyr_in")
    photo = sorted((shared_dir / "images/content").glob("*.jpg"))[0]
    with Image.open(photo) as im:
        im.convert("RGB").resize((283, 197), Image.Resampling.LANCZOS).save(d / "c.png")  # odd, 2 x 1 DZI tiles
    with Image.open(shared_dir / "images/style/cd_style_in2.jpg") as im:
        im.convert("RGB").resize((64, 64)).save(d / "style.png")
    return d


def _run(runner, inputs: Path, out: Path, fmt: str, **kw) -> Path:
    pairs = plan_pairs([inputs / "c.png"], [StyleSpec((inputs / "style.png",))], out, fmt)
    summary = run_batch(runner, pairs, StylizeOptions(levels=(5, 4), style_size=64, format=fmt, io_workers=1, **kw))
    assert [r.status for r in summary.results] == ["done"], summary.results[0].error
    assert summary.results[0].megapixels == pytest.approx(283 * 197 / 1e6)
    return pairs[0].output


def test_batch_dzi_and_tiff_pyramid_equal_the_png_output(runner, inputs: Path, tmp_path: Path, monkeypatch) -> None:
    handed = []
    real = pyramid.save_output

    def spy(out, *a, **k):
        handed.append(type(out).__name__)
        return real(out, *a, **k)

    monkeypatch.setattr("ultrastyle.runtime.batch.save_output", spy)
    png = read_image(_run(runner, inputs, tmp_path / "png", "png"))
    dzi = _run(runner, inputs, tmp_path / "dzi", "dzi", pyramid=PyramidOptions(dzi_tile_format="png"))
    tif = _run(runner, inputs, tmp_path / "tif", "tiff", pyramid=PyramidOptions(tiff_layout="pyramid"))
    assert handed == ["ndarray", "Canvas", "Canvas"]  # png as before; the zoomable ones from the canvas
    assert dzi.name == "c_stylized_style.dzi"
    np.testing.assert_array_equal(_assemble(dzi.with_name("c_stylized_style_files"), 9, 197, 283, "png"), png)
    with tifffile.TiffFile(tif) as t:
        levels = t.series[0].levels
        np.testing.assert_array_equal(levels[0].asarray(), png)
        np.testing.assert_array_equal(levels[1].asarray(), _halve(png))


def test_a_killed_dzi_write_leaves_nothing_after_the_rerun(inputs: Path, cd16x_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        import ultrastyle.io.pyramid as pyramid
        STALL = {{stall}}
        real, n = pyramid._write_tile, [0]
        def _write_tile(*a):
            n[0] += 1
            if STALL and n[0] == 3:
                time.sleep(600)
            return real(*a)
        pyramid._write_tile = _write_tile
        from ultrastyle.cli.main import app
        sys.argv = ["ultrastyle", "stylize", {str(inputs / "c.png")!r}, "--style", {str(inputs / "style.png")!r},
                    "-o", {str(out)!r}, "--model", {str(cd16x_dir)!r}, "--backend", "torch", "--levels", "5,4",
                    "--style-size", "64", "--format", "dzi", "--skip-existing"]
        app()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script.replace("{stall}", "True")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        end = time.time() + 120
        while not (out.is_dir() and any((p / "9").is_dir() for p in out.iterdir() if "partial" in p.name)):
            assert time.time() < end and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    left = sorted(p.name for p in out.iterdir())
    # only temp names: the .dzi, the page and the tile folder (staged together, renamed once all are complete)
    assert [n.split(".")[1] for n in left] == ["c_stylized_style", "c_stylized_style", "c_stylized_style_files"], left
    assert all(n.endswith(".ultrastyle-partial") for n in left) and any(n.startswith(".c_stylized_style.dzi.") for n in left), left
    rerun = subprocess.run([sys.executable, "-c", script.replace("{stall}", "False")], cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == ["c_stylized_style.dzi", "c_stylized_style.html", "c_stylized_style_files"]


@pytest.mark.parametrize("positioned", [True, False], ids=["pread", "seek"])  # seek: Windows, which has no os.pread/pwrite
def test_tiff_pyramid_band_by_band_equals_tifffile_writing_whole_levels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        positioned: bool) -> None:  # fmt: skip
    """Byte for byte: the streamed writer (bands, reduced levels spilled to scratch) vs tifffile given each whole level."""
    if not positioned:
        for name in ("preadv", "pread", "pwrite"):
            monkeypatch.delattr("ultrastyle.core.canvas.os." + name, raising=False)
    a = _noise(601, 1031)
    monkeypatch.setattr(pyramid, "_SPILL_BYTES", 1000)  # every reduced level through the scratch file
    streamed = write_tiff_pyramid(canvas_from_array(a), tmp_path / "s.tif")
    levels = [a]
    while len(levels) < len(tiff_levels(601, 1031)):
        levels.append(_halve(levels[-1]))
    kwargs = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "predictor": True, "metadata": None}
    with tifffile.TiffWriter(tmp_path / "w.tif") as tif:
        tif.write(levels[0], subifds=len(levels) - 1, **kwargs)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, **kwargs)
    assert streamed.read_bytes() == (tmp_path / "w.tif").read_bytes()


def test_skip_existing_counts_a_dzi_only_beside_its_tiles(tmp_path: Path) -> None:
    from ultrastyle.runtime.batch import output_exists

    dzi = tmp_path / "a_stylized_b.dzi"
    dzi.write_text("<Image/>")
    assert not output_exists(dzi)  # its tile folder was deleted: run it again
    (tmp_path / "a_stylized_b_files").mkdir()
    assert output_exists(dzi) and not output_exists(tmp_path / "none.png")
    (tmp_path / "empty.png").write_bytes(b"")  # another tool's, or a full disk's: redone, not kept
    assert not output_exists(tmp_path / "empty.png")
    upper = tmp_path / "c.DZI"
    upper.write_text("<Image/>")
    (tmp_path / "c_files").mkdir()
    assert not output_exists(upper)  # its tiles are c.DZI_files (OpenSeadragon's rule), not c_files
    (tmp_path / "c.DZI_files").mkdir()
    assert output_exists(upper)


@pytest.mark.parametrize("fail_at", ["tiles", "page"])
def test_a_failed_dzi_write_leaves_nothing_new_and_keeps_an_old_output_whole(tmp_path: Path, monkeypatch, fail_at: str) -> None:
    """A full disk while the tiles or the page are written: no orphan tile folder, no temp file, the old pyramid intact."""
    import errno

    first = write_dzi(_noise(300, 200, seed=1), tmp_path / "o.dzi")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_at == "tiles":
        monkeypatch.setattr(pyramid._DziTiler, "check_done", full)
    else:
        monkeypatch.setattr(pyramid, "viewer_html", full)
    with pytest.raises(ImageError, match=r"o\.dzi: cannot write the Deep Zoom pyramid \(No space left on device\)"):
        write_dzi(_noise(400, 500, seed=2), first)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # the old output, byte for byte, and nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.dzi", "o.html", "o_files"]
    with pytest.raises(ImageError):
        write_dzi(_noise(40, 50), tmp_path / "new.dzi")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.dzi", "o.html", "o_files"]  # a first write that fails leaves nothing


def test_an_old_deep_zoom_output_s_tiles_go_only_once_the_new_dzi_is_in_place(tmp_path, monkeypatch):
    """Deleting a gigapixel pyramid's old tiles takes a while: a kill then left no NAME.dzi at all (the old one gone, the
    new one not yet renamed in), so neither output was there."""
    path = tmp_path / "x.dzi"
    write_dzi(_noise(40, 50), path)
    seen = []
    real = pyramid.remove_tree
    monkeypatch.setattr(pyramid, "remove_tree", lambda old: seen.append((old.name, path.is_file(), json.dumps(path.read_text()))) or real(old))
    write_dzi(_noise(60, 70), path)
    assert len(seen) == 1 and seen[0][0].startswith(".x_files.") and seen[0][1] and 'Width=\\"70\\"' in seen[0][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dzi", "x.html", "x_files"]  # the old tiles gone after all
