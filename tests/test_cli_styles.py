"""`ultrastyle stylize --mix / --mask / --preserve-color` end to end on tiny images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner, Result

from ultrastyle.cli.main import app
from ultrastyle.core.color import chroma

W, H = 48, 40


@pytest.fixture(scope="module")
def images(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny copies of shared images (in a temp folder, never in the repo) and masks."""
    d = tmp_path_factory.mktemp("styles_in")
    src = shared_dir / "images"
    out: dict[str, Path] = {}
    for key, name, size in (("c", "content/cd_content_in4.jpg", (W, H)), ("s1", "style/cd_style_in2.jpg", (64, 64)),
                            ("s2", "style/cd_style_in4.jpg", (64, 64))):  # fmt: skip
        with Image.open(src / name) as im:
            im.convert("RGB").resize(size, Image.Resampling.LANCZOS).save(d / f"{key}.png")
        out[key] = d / f"{key}.png"
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2 :] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(mask[:, :-2]).save(d / "mask_small.png")
    three = mask.copy()
    three[: H // 4] = 128
    Image.fromarray(three).save(d / "mask3.png")
    out.update(mask=d / "mask.png", mask_small=d / "mask_small.png", mask3=d / "mask3.png")
    return out


@pytest.fixture
def invoke(cd16x_dir: Path):  # noqa: ANN201
    def run(*args: object) -> Result:
        argv = ["stylize", *map(str, args), "--style-size", "64", "--model", str(cd16x_dir), "--backend", "torch"]
        return CliRunner().invoke(app, argv)

    return run


def _read(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255


def test_mix_writes_one_output_named_after_the_normalised_weights(invoke, images, tmp_path):
    r = invoke(images["c"], "--mix", f"{images['s1']}=3", "--mix", f"{images['s2']}=1", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c_stylized_s1@0.75+s2@0.25.png"]
    r = invoke(images["c"], "--style", images["s1"], "-o", tmp_path)
    mixed, alone = _read(tmp_path / "c_stylized_s1@0.75+s2@0.25.png"), _read(tmp_path / "c_stylized_s1.png")
    assert np.abs(mixed - alone).mean() > 0.005  # the second style changed the result


@pytest.mark.parametrize("item,message", [("nofile.png=1", "no such style image"), ("{s1}", "expected STYLE=WEIGHT"),
                                          ("{s1}=heavy", "not a number"), ("{s1}=-1", ">= 0")])  # fmt: skip
def test_mix_refuses_bad_items_with_one_clear_message(invoke, images, tmp_path, item, message):
    r = invoke(images["c"], "--mix", item.format(**images), "--mix", f"{images['s2']}=1", "-o", tmp_path)
    assert r.exit_code == 2 and message in r.output, r.output
    assert r.stderr.startswith("Usage:"), repr(r.stderr[:40])  # no blank lines from a progress bar dropped after the model opened


def test_mix_and_style_together_are_refused(invoke, images, tmp_path):
    r = invoke(images["c"], "--style", images["s1"], "--mix", f"{images['s2']}=1", "-o", tmp_path)
    assert r.exit_code == 2 and "either --style" in r.output


def test_mask_gives_each_region_its_style_and_tiles_match_the_whole_image(invoke, images, tmp_path):
    args = (images["c"], "--style", images["s1"], "--style", images["s2"], "--mask", images["mask"], "--format", "png", "--depth", "16")
    assert invoke(*args, "-o", tmp_path / "tiled", "--tile", "16").exit_code == 0
    r = invoke(*args, "-o", tmp_path / "whole", "--no-tile")
    assert r.exit_code == 0, r.output
    name = "c_stylized_s1+s2_mask-mask.png"
    tiled, whole = _read(tmp_path / "tiled" / name), _read(tmp_path / "whole" / name)
    assert np.abs(tiled - whole).max() <= 1 / 255
    for s in ("s1", "s2"):
        assert invoke(images["c"], "--style", images[s], "-o", tmp_path / s).exit_code == 0
    one, two = _read(tmp_path / "s1" / "c_stylized_s1.png"), _read(tmp_path / "s2" / "c_stylized_s2.png")
    left, right = slice(2, W // 2 - 8), slice(W // 2 + 8, W - 2)  # away from the border between regions
    assert np.abs(whole[:, left] - one[:, left]).mean() < np.abs(whole[:, left] - two[:, left]).mean()
    assert np.abs(whole[:, right] - two[:, right]).mean() < np.abs(whole[:, right] - one[:, right]).mean()


def test_mask_with_a_label_without_style_is_refused_before_any_work(invoke, images, tmp_path):
    r = invoke(images["c"], "--style", images["s1"], "--style", images["s2"], "--mask", images["mask3"], "-o", tmp_path)
    assert r.exit_code == 2
    assert "mask3.png: the mask has 3 labels but 2 style(s) were given" in r.output
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_mask_labels_may_share_a_style_given_twice(invoke, images, tmp_path):
    # Three labels in ascending grey (left 0, top band 128, right 255): the first style covers left and right.
    r = invoke(images["c"], "--style", images["s1"], "--style", images["s2"], "--style", images["s1"], "--mask", images["mask3"], "-o", tmp_path)
    assert r.exit_code == 0, r.output
    (out,) = tmp_path.iterdir()
    assert out.name == "c_stylized_s1+s2+s1_mask-mask3.png"


def test_mask_of_the_wrong_size_fails_the_pair_naming_both_sizes(invoke, images, tmp_path, monkeypatch):
    # The size of no content: refused from the headers, before the mask is decoded (a 12k mask took 1.7 GB to be told).
    import ultrastyle.io.masks

    decoded = []
    monkeypatch.setattr(ultrastyle.io.masks, "read_image", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    r = invoke(images["c"], "--style", images["s1"], "--style", images["s2"], "--mask", images["mask_small"], "-o", tmp_path / "a")
    assert r.exit_code == 2 and not decoded
    assert f"mask_small.png: the mask is {W - 2}x{H} but the content is {W}x{H}" in r.output
    monkeypatch.undo()
    # The size of one content: the others' pairs fail alone.
    small = tmp_path / "small.png"
    Image.open(images["c"]).crop((0, 0, W - 2, H)).save(small)
    r = invoke(images["c"], small, "--style", images["s1"], "--style", images["s2"], "--mask", images["mask_small"], "-o", tmp_path / "b")
    assert r.exit_code == 1 and f"the mask is {W - 2}x{H} but the content is {W}x{H}" in r.output
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["small_stylized_s1+s2_mask-mask_small.png"]


def test_mask_follows_a_resized_content(invoke, images, tmp_path):
    r = invoke(images["c"], "--style", images["s1"], "--style", images["s2"], "--mask", images["mask"], "--content-size", "96", "-o", tmp_path)
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "c_stylized_s1+s2_mask-mask.png").size == (96, 80)


# Chroma tolerance of --preserve-color luminance, in [0, 1] units, where the
# result is representable (no channel at 0 or 1): 8-bit rounding of three
# channels moves Cb/Cr by at most ~0.0035. Elsewhere the chroma is scaled
# towards grey on purpose (tests/test_styles.py checks the hue is kept).
CHROMA_ATOL = 0.004


def test_preserve_color_luminance_keeps_the_contents_chroma(invoke, images, tmp_path):
    for s in ("s1", "s2"):
        assert invoke(images["c"], "--style", images[s], "--preserve-color", "luminance", "-o", tmp_path / "keep").exit_code == 0
        assert invoke(images["c"], "--style", images[s], "-o", tmp_path / "plain").exit_code == 0
        content = np.moveaxis(_read(images["c"]), 2, 0)
        keep = np.moveaxis(_read(tmp_path / "keep" / f"c_stylized_{s}.png"), 2, 0)
        plain = np.moveaxis(_read(tmp_path / "plain" / f"c_stylized_{s}.png"), 2, 0)
        inside = ((keep > 0) & (keep < 1)).all(0)
        assert inside.mean() > 0.3, f"only {inside.mean():.2f} of the pixels are representable: the check would be vacuous"
        err = np.abs(chroma(keep) - chroma(content)).max(0)
        assert err[inside].max() <= CHROMA_ATOL, f"{s}: chroma off by {err[inside].max():.4f}"
        assert np.abs(chroma(plain) - chroma(content)).mean() > 5 * err[inside].mean()  # the style did change the colours
        y = lambda x: 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # noqa: E731
        assert np.abs(y(keep) - y(np.clip(plain, 0, 1))).mean() < 0.01  # and the stylized luminance is kept


def test_preserve_color_match_moves_the_palette_towards_the_content(invoke, images, tmp_path):
    assert invoke(images["c"], "--style", images["s1"], "--preserve-color", "match", "-o", tmp_path / "match").exit_code == 0
    assert invoke(images["c"], "--style", images["s1"], "-o", tmp_path / "plain").exit_code == 0
    content = _read(images["c"]).reshape(-1, 3)
    match = _read(tmp_path / "match" / "c_stylized_s1.png").reshape(-1, 3)
    plain = _read(tmp_path / "plain" / "c_stylized_s1.png").reshape(-1, 3)
    assert np.abs(match.mean(0) - content.mean(0)).sum() < np.abs(plain.mean(0) - content.mean(0)).sum()


def test_mix_and_mask_mistakes_are_refused_before_the_model_is_fetched(images, tmp_path, monkeypatch):
    """A fresh install: the usage error, not a download of the model first (nothing is installed here)."""
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ULTRASTYLE_MIRROR", str(tmp_path / "nowhere"))  # a download would fail loudly, not hang

    def run(*args: object) -> Result:
        return CliRunner().invoke(app, ["stylize", *map(str, args), "-m", "cd-wct-16x", "-o", str(tmp_path / "o")])

    cases = {
        "mask": run(images["c"], "--style", images["s1"], "--style", images["s2"], "--mask", images["mask3"]),
        "weights": run(images["c"], "--mix", f"{images['s1']}=-1", "--mix", f"{images['s2']}=1"),
        "zero": run(images["c"], "--mix", f"{images['s1']}=0", "--mix", f"{images['s2']}=0"),
        "one --mix, two values": run(images["c"], "--mix", f"{images['s1']}=0.7", f"{images['s2']}=0.3"),
        # the library's rule (one file by its absolute path), not the CLI's own (it compared the paths as written)
        "twice": run(images["c"], "--mix", f"{images['s1']}=0.5", "--mix", f"{images['s1'].parent}/../{images['s1'].parent.name}/{images['s1'].name}=0.5"),
    }
    said = {k: " ".join(r.output.replace("│", " ").split()) for k, r in cases.items()}
    assert all(r.exit_code == 2 for r in cases.values()), said
    assert "the mask has 3 labels but 2 style(s)" in said["mask"] and ">= 0" in said["weights"] and "all zero" in said["zero"]
    assert "two or more styles, each given with its own --mix" in said["one --mix, two values"]
    assert "given twice" in said["twice"]
    assert not any("download" in text or "nowhere" in text for text in said.values()), said
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_a_mask_painted_on_a_transparent_layer_has_the_transparent_region_as_a_label(tmp_path):
    from ultrastyle.io.masks import read_labels

    a = np.zeros((8, 12, 4), np.uint8)
    a[:, :6, :3] = (12, 34, 56)  # transparent, whatever its colour channels hold
    a[:, 6:] = (255, 255, 255, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "m.png")
    labels, colours = read_labels(tmp_path / "m.png")
    assert colours == [(0, 0, 0, 0), (255, 255, 255, 255)]  # two labels, not one white region
    assert (labels[:, :6] == 0).all() and (labels[:, 6:] == 1).all()


def test_a_transparent_region_is_a_label_in_16_bit_files_and_in_memory_masks_too(tmp_path):
    import imagecodecs
    import tifffile

    from ultrastyle.io.masks import labels_of, read_labels
    from ultrastyle.io.sources import as_source

    a = np.zeros((8, 12, 4), np.uint8)
    a[:, :6, :3] = (12, 34, 56)  # transparent, whatever its colour channels hold
    a[:, 6:] = (255, 255, 255, 255)
    a16 = a.astype(np.uint16) * 257
    (tmp_path / "m16.png").write_bytes(imagecodecs.png_encode(a16))
    tifffile.imwrite(tmp_path / "m16.tif", a16, photometric="rgb", extrasamples=["unassalpha"])
    for f in ("m16.png", "m16.tif"):
        labels, colours = read_labels(tmp_path / f)
        assert colours == [(0, 0, 0, 0), (65535, 65535, 65535, 65535)], f  # two labels, not one white region
        assert (labels[:, :6] == 0).all() and (labels[:, 6:] == 1).all(), f
    given = a.copy()
    for mask in (given, Image.fromarray(a, "RGBA"), a16):
        src = as_source(mask, "mask", keep_alpha=True)
        labels, colours = labels_of(src.pixels)
        assert len(colours) == 2 and (labels[:, :6] == 0).all() and (labels[:, 6:] == 1).all(), type(mask)
    assert np.array_equal(given, a)  # the caller's array is left as it was
    assert as_source(a, "content").pixels.shape == (8, 12, 3)  # an image, not a mask: over white as before


def test_mask_labels_come_in_ascending_colour_for_any_sample_type():
    from ultrastyle.io.masks import labels_of

    rgba16 = np.zeros((2, 3, 4), np.uint16)
    rgba16[0, 0], rgba16[0, 1] = (40000, 0, 0, 65535), (100, 0, 0, 65535)  # red above 2**15: no sign bit in the order
    assert labels_of(rgba16)[1] == [(0, 0, 0, 0), (100, 0, 0, 65535), (40000, 0, 0, 65535)]
    floats = np.zeros((2, 2, 3), np.float32)
    floats[0, 0], floats[0, 1] = (1, 0, 0), (0, 1, 0)  # three colours, not one (0, 0, 0)
    labels, colours = labels_of(floats)
    assert colours == [(0, 0, 0), (0, 65535, 0), (65535, 0, 0)] and labels[0].tolist() == [2, 1]


def test_the_cli_decodes_a_mask_once_for_its_early_check_and_its_batch(cd16x_dir, shared_dir, tmp_path, monkeypatch):
    import os
    import threading

    import ultrastyle.io.masks as masks
    from ultrastyle.cli.main import app

    decoded: list[Path] = []
    read_image = masks.read_image
    monkeypatch.setattr(masks, "read_image", lambda path, **kw: decoded.append(Path(path)) or read_image(path, **kw))
    Image.open(shared_dir / "images/content/cd_content_in2.jpg").convert("RGB").resize((64, 48)).save(tmp_path / "c.png")
    for s in ("s1", "s2"):
        Image.open(shared_dir / "images/style/cd_style_in3.jpg").convert("RGB").resize((64, 48)).save(tmp_path / f"{s}.png")
    a = np.zeros((48, 64), np.uint8)
    a[:, 32:] = 255
    Image.fromarray(a).save(tmp_path / "m.png")
    r = CliRunner().invoke(app, ["stylize", str(tmp_path / "c.png"), "-s", str(tmp_path / "s1.png"), "-s", str(tmp_path / "s2.png"),
                                 "--mask", str(tmp_path / "m.png"), "-o", str(tmp_path / "out"), "--model", str(cd16x_dir)])  # fmt: skip
    assert r.exit_code == 0 and (tmp_path / "out" / "c_stylized_s1+s2_mask-m.png").is_file(), r.output
    assert decoded == [tmp_path / "m.png"] and masks._kept.get() is None  # once; nothing kept after the command
    masks.read_labels(tmp_path / "m.png")
    masks.read_labels(tmp_path / "m.png")
    assert len(decoded) == 3  # outside keep_labels, every read decodes
    with masks.keep_labels():
        masks.read_labels(tmp_path / "m.png")
        masks.read_labels(tmp_path / "m.png")
        a[:, :8] = 128  # a new version of the file: read again, with its three labels
        Image.fromarray(a).save(tmp_path / "m.png")
        os.utime(tmp_path / "m.png", ns=(0, os.stat(tmp_path / "m.png").st_mtime_ns + 10**9))
        assert len(masks.read_labels(tmp_path / "m.png")[1]) == 3
        other = threading.Thread(target=masks.read_labels, args=(tmp_path / "m.png",))
        other.start()  # another thread's reads are its own: decoded, not kept
        other.join()
    assert len(decoded) == 6 and masks._kept.get() is None


@pytest.mark.parametrize("kind", ["grey8", "grey16", "rgb8", "rgba8", "rgb16"])
def test_mask_labels_made_band_by_band_equal_one_sort_of_the_whole_mask(kind, monkeypatch):
    import ultrastyle.io.masks as masks

    rng = np.random.default_rng(3)
    palette = rng.integers(0, 65536 if kind.endswith("16") else 256, (6, 4)).astype(np.uint16 if kind.endswith("16") else np.uint8)
    palette[:, 3] = np.iinfo(palette.dtype).max
    index = rng.integers(0, 6, (37, 23))
    a = palette[index]
    a = {"grey8": a[..., 0], "grey16": a[..., 0], "rgb8": a[..., :3], "rgba8": a, "rgb16": a[..., :3]}[kind]
    a = a.copy()
    if kind == "rgba8":
        a[:5, :, 3] = 0  # a transparent band: one more label
    whole = masks.labels_of(a)
    monkeypatch.setattr(masks, "LABEL_BAND_PIXELS", 50)  # bands of 2 rows: every band boundary crossed
    banded = masks.labels_of(a)
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    keys = [tuple(int(x) for x in px) for px in flat.reshape(-1, flat.shape[-1])]
    expected = sorted(set(keys))  # ascending colour, the order the labels promise (grey: one value)
    assert banded[1] == whole[1] and np.array_equal(banded[0], whole[0])
    if kind != "rgba8":  # (opaque packing drops alpha; a transparent region packs all four channels)
        assert [c[: len(expected[0])] for c in banded[1]] == expected
        assert np.array_equal(banded[0].ravel(), np.array([expected.index(k) for k in keys]))
