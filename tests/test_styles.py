"""Style mixes, mask regions and colour preservation: semantics, tiled = whole, clear errors."""

from __future__ import annotations

from pathlib import Path

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.color import chroma, luminance, keep_content_chroma, keep_content_chroma_canvas, match_colors, rgb_statistics
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.styles import Regions, Target, apply_regions, mix_weights, region_statistics
from ultrastyle.core.transforms import FeatureStats, fit_affine
from ultrastyle.io.images import ImageError, load_image, resize_long_side
from ultrastyle.io.masks import read_labels, resize_labels
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.pairs import StyleSpec
from ultrastyle.runtime.cascade import style_statistics, stylize

# float32 tolerance of tiled vs whole-image results in [0, 1] (as tests/test_tiling.py).
from ultrastyle.runtime.tiled import stylize_tiled

# float32 tolerance of tiled vs whole-image results in [0, 1] (as tests/test_tiling.py).
ATOL = {torch.float32: 1e-4}
LEVELS = (5, 3, 1)  # deep, middle and full-resolution stages keep the runs short


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir, stages=LEVELS)


@pytest.fixture(scope="module")
def images(shared_dir):
    def load(rel, size):
        return resize_long_side(load_image(shared_dir / "images" / rel), size)

    return {
        "content": load("content/cd_content_in4.jpg", 150)[:, :, :130],  # off the 16-px grid on both axes
        "s1": load("style/cd_style_in2.jpg", 96),
        "s2": load("style/cd_style_in3.jpg", 96),
    }


def _two_regions(h: int, w: int) -> np.ndarray:
    """Label 1 in a diagonal band and a disc, 0 elsewhere: regions that cut across tiles."""
    yy, xx = np.mgrid[:h, :w]
    return (((xx - yy) % 70 < 30) | ((yy - h / 3) ** 2 + (xx - w / 2) ** 2 < 15**2)).astype(np.uint8)


def _tiled(model, content, style, method, tile=48):
    with canvas_from_array(content.numpy(), layout="chw") as cv:
        out = stylize_tiled(model, cv, style, TilingOptions(tile=tile), method=method, alpha=0.8, levels=LEVELS)
        try:
            return torch.from_numpy(out.numpy().copy())
        finally:
            out.close()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.clamp(0, 1) - b.clamp(0, 1)).abs().max())


# ---------------------------------------------------------------- mixes


def test_mix_weights_are_normalised_and_validated():
    assert mix_weights([0.7, 0.7]) == (0.5, 0.5)
    assert mix_weights([3, 1]) == (0.75, 0.25)
    with pytest.raises(ValueError, match=">= 0"):
        mix_weights([0.5, -0.1])
    with pytest.raises(ValueError, match="all zero"):
        mix_weights([0, 0])
    with pytest.raises(ValueError, match="one weight per style"):
        Target(({},), (0.5, 0.5))
    with pytest.raises(ValueError, match="one weight per style"):
        StyleSpec((Path("a.jpg"), Path("b.jpg")), (1.0,))


def test_style_spec_names_outputs_by_styles_and_normalised_weights():
    spec = StyleSpec((Path("x/a.jpg"), Path("y/b.png")), (0.7, 2.1))
    assert spec.weights == pytest.approx((0.25, 0.75))
    assert spec.name == "a@0.25+b@0.75"
    assert StyleSpec((Path("a.jpg"), Path("b.jpg")), mask=Path("m.png")).name == "a+b_mask-m"
    with pytest.raises(ValueError, match="mask"):
        StyleSpec((Path("a.jpg"), Path("b.jpg")), (1.0, 1.0), mask=Path("m.png"))


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_mix_blends_the_transformed_features(method):
    torch.manual_seed(0)
    f = torch.randn(1, 6, 9, 7, dtype=torch.float64) * 2 + 1
    s1 = {1: FeatureStats.of(torch.randn(1, 6, 8, 8, dtype=torch.float64) * 3)}
    s2 = {1: FeatureStats.of(torch.randn(1, 6, 8, 8, dtype=torch.float64) + 4)}
    cs = FeatureStats.of(f)
    a, b = Target((s1, s2), (3.0, 1.0)).fit(method, 1, cs, 0.9)
    flat = f[0].reshape(6, -1)
    want = sum(w * (ai @ flat + bi[:, None]) for w, (ai, bi) in zip((0.75, 0.25), (fit_affine(method, cs, s[1], 0.9) for s in (s1, s2))))
    assert torch.allclose(a @ flat + b[:, None], want, atol=1e-10)
    one = Target((s1,)).fit(method, 1, cs, 0.9)
    assert torch.allclose(one[0], fit_affine(method, cs, s1[1], 0.9)[0])


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_mix_tiled_equals_whole(cd16x, images, method):
    target = Target(tuple(style_statistics(cd16x, images[k], LEVELS) for k in ("s1", "s2")), (0.7, 0.3))
    ref = stylize(cd16x, images["content"], target, method=method, alpha=0.8, levels=LEVELS)
    got = _tiled(cd16x, images["content"], target, method)
    assert _max_diff(got, ref) <= ATOL[torch.float32]
    # and the mix is neither of its styles alone
    alone = stylize(cd16x, images["content"], target.stats[0], method=method, alpha=0.8, levels=LEVELS)
    assert _max_diff(alone, ref) > 0.01


# ---------------------------------------------------------------- regions


def test_region_statistics_partition_the_whole_and_apply_regions_uses_each_map():
    torch.manual_seed(1)
    f = torch.randn(1, 4, 6, 5, dtype=torch.float64)
    labels = torch.from_numpy(_two_regions(6, 5).astype(np.int64))
    parts = region_statistics(f, labels, 2)
    whole = FeatureStats.of(f)
    assert parts[0].count + parts[1].count == whole.count
    assert torch.allclose(parts[0].outer + parts[1].outer, whole.outer)
    maps = [(torch.eye(4, dtype=torch.float64) * 2, torch.zeros(4, dtype=torch.float64)),
            (torch.eye(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))]  # fmt: skip
    out = apply_regions(f, labels, maps)
    sel = labels.bool()
    assert torch.allclose(out[0][:, ~sel], 2 * f[0][:, ~sel])
    assert torch.allclose(out[0][:, sel], f[0][:, sel] + 1)


def test_a_label_with_no_pixels_gets_empty_statistics_and_leaves_no_hole():
    torch.manual_seed(2)
    f = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    labels = torch.full((4, 4), 2, dtype=torch.int64)  # labels 0 and 1 absent from this tile
    parts = region_statistics(f, labels, 3, host=False)
    assert [p.count for p in parts] == [0, 0, 16]
    assert torch.equal(parts[0].sum, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(parts[2].outer, FeatureStats.of(f).outer)
    maps = [(torch.zeros(3, 3, dtype=torch.float64), torch.full((3,), 7.0, dtype=torch.float64))] * 2
    maps.append((torch.eye(3, dtype=torch.float64), -torch.ones(3, dtype=torch.float64)))
    assert torch.equal(apply_regions(f, labels, maps), f - 1)  # every pixel written, by its own region's map


def test_feature_labels_take_the_cell_centre_and_mirror_past_the_edge():
    lab = np.arange(5 * 7, dtype=np.uint8).reshape(5, 7) % 3
    regions = Regions(lab, (Target(({},)),) * 3)
    got = regions.feature_labels(2, slice(0, 4), slice(0, 4)).numpy()  # padded 8x8 at grid 2
    rows = [1, 3, 3, 1]  # 5 mirrors to 3, 7 to 1 (reflection without edge repeat, as the grid padding)
    cols = [1, 3, 5, 5]  # 7 mirrors to 5
    assert (got == lab[np.ix_(rows, cols)]).all()


@pytest.mark.parametrize("method", ["wct", "adain"])
def test_mask_tiled_equals_whole_and_regions_get_their_own_style(cd16x, images, method):
    content = images["content"]
    h, w = content.shape[-2:]
    stats = [style_statistics(cd16x, images[k], LEVELS) for k in ("s1", "s2")]
    regions = Regions(_two_regions(h, w), (Target((stats[0],)), Target((stats[1],))))
    ref = stylize(cd16x, content, regions, method=method, alpha=0.8, levels=LEVELS)
    got = _tiled(cd16x, content, regions, method)
    assert _max_diff(got, ref) <= ATOL[torch.float32]
    # Far from the region borders, the two regions look like their own style, not the other's.
    only = [stylize(cd16x, content, s, method=method, alpha=0.8, levels=LEVELS) for s in stats]
    lab = torch.from_numpy(_two_regions(h, w)).bool()
    inner = torch.from_numpy(np.asarray(Image.fromarray(_two_regions(h, w) * 255).filter(ImageFilter.MinFilter(9))) > 0)
    assert inner.any()
    d_own = (ref - only[1]).abs().mean(0)[inner].mean()
    d_other = (ref - only[0]).abs().mean(0)[inner].mean()
    assert d_own < 0.5 * d_other, (float(d_own), float(d_other))
    assert (lab.sum() > 0) and (~lab).sum() > 0


def test_a_region_too_small_for_a_stage_falls_back_to_the_whole_image_statistics(cd16x, images):
    content = images["content"]
    h, w = content.shape[-2:]
    lab = np.zeros((h, w), np.uint8)
    lab[5, 7] = 1  # one pixel: no feature pixel at stage 5 samples it, one at stage 1
    stats = [style_statistics(cd16x, images[k], LEVELS) for k in ("s1", "s2")]
    regions = Regions(lab, (Target((stats[0],)), Target((stats[1],))))
    out = stylize(cd16x, content, regions, method="wct", alpha=0.8, levels=LEVELS)
    assert torch.isfinite(out).all()
    assert _max_diff(_tiled(cd16x, content, regions, "wct"), out) <= ATOL[torch.float32]


def test_regions_refuse_a_label_without_style_and_a_mask_of_the_wrong_size(cd16x, images):
    with pytest.raises(ValueError, match="label 2 has no style"):
        Regions(np.array([[0, 1], [2, 0]], np.uint8), (Target(({},)), Target(({},))))
    regions = Regions(np.zeros((10, 12), np.uint8), (Target(({},)),))
    with pytest.raises(ValueError, match="the mask is 12x10 but the content is 130x150"):
        stylize(cd16x, images["content"], regions, levels=LEVELS)


def test_read_labels_numbers_colours_in_ascending_order(tmp_path):
    a = np.zeros((4, 6, 3), np.uint8)
    a[:, 2:4] = (0, 0, 255)
    a[:, 4:] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "rgb.png")
    labels, colours = read_labels(tmp_path / "rgb.png")
    assert colours == [(0, 0, 0), (0, 0, 255), (255, 0, 0)]
    assert (labels[0] == [0, 0, 1, 1, 2, 2]).all()
    Image.fromarray(np.array([[200, 10], [10, 90]], np.uint8)).save(tmp_path / "grey.png")
    labels, colours = read_labels(tmp_path / "grey.png")
    assert colours == [(10,), (90,), (200,)] and (labels == [[2, 0], [0, 1]]).all()
    assert (resize_labels(labels, 4, 4) == np.repeat(np.repeat(labels, 2, 0), 2, 1)).all()


def test_read_labels_refuses_a_photo(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(ImageError, match=r"photo\.png: \d+ distinct colours"):
        read_labels(tmp_path / "photo.png")


# ---------------------------------------------------------------- colour


def test_keep_content_chroma_keeps_chroma_and_the_results_luminance():
    torch.manual_seed(2)
    content = torch.rand(3, 8, 9) * 0.3 + 0.35  # mild colours: every combination stays in [0, 1]
    result = torch.rand(3, 8, 9) * 0.4 + 0.3
    out = keep_content_chroma(result, content)
    assert torch.allclose(chroma(out), chroma(content), atol=1e-6)
    assert torch.allclose(luminance(out), luminance(result), atol=1e-6)


def test_keep_content_chroma_scales_unrepresentable_chroma_towards_grey_keeping_hue_and_luminance():
    content = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # saturated red
    result = torch.full((3, 1, 1), 0.95)  # very bright stylized luminance
    out = keep_content_chroma(result, content)
    assert float(out.max()) <= 1 and float(out.min()) >= 0
    assert torch.allclose(luminance(out), luminance(result), atol=1e-6)
    cc, co = chroma(content).flatten(), chroma(out).flatten()
    assert 0 < co.norm() < cc.norm()  # less saturated ...
    assert torch.allclose(co / co.norm(), cc / cc.norm(), atol=1e-5)  # ... same hue
    with canvas_from_array(result.numpy(), layout="chw") as rc, canvas_from_array(content.numpy(), layout="chw") as cc:
        keep_content_chroma_canvas(rc, cc, band=3)
        assert np.allclose(rc.numpy(), out.numpy(), atol=1e-6)


def test_match_colors_gives_the_style_the_contents_rgb_mean_and_covariance():
    torch.manual_seed(3)
    style = (torch.rand(3, 40, 40) * torch.tensor([0.3, 0.5, 0.2])[:, None, None] + 0.2).clamp(0, 1)
    content = torch.rand(3, 30, 30) * 0.4 + torch.tensor([0.4, 0.2, 0.3])[:, None, None]
    target = rgb_statistics(content)
    got = rgb_statistics(match_colors(style, target))
    assert torch.allclose(got.mean, target.mean, atol=2e-3)
    assert torch.allclose(got.covariance(), target.covariance(), atol=2e-3)


def test_match_colors_to_a_one_pixel_content_is_that_pixels_colour():
    # One pixel has a colour and no spread: the style takes that colour, flat (it raised "covariance needs 2 pixels").
    style = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    pixel = torch.tensor([0.7, 0.2, 0.4])[:, None, None]
    out = match_colors(style, rgb_statistics(pixel))
    assert torch.allclose(out, pixel.expand_as(out), atol=1e-5)
    flat = match_colors(pixel, rgb_statistics(style))  # a one-pixel style takes the content's mean
    assert torch.allclose(flat[:, 0, 0], rgb_statistics(style).mean.float(), atol=1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu)], indirect=True)  # the CPU: the tests above
@pytest.mark.parametrize("method", ["wct", "adain"])
def test_mask_and_mix_tiled_equal_whole_on_cuda(cd16x_dir, images, device, method):
    # Through the runner: on CUDA it computes in IEEE float32 (PyTorch's default TF32 breaks exactness).
    with TorchRunner(load_cd_folder(cd16x_dir, stages=LEVELS).to(device)) as model:
        content = images["content"]
        stats = [style_statistics(model, images[k], LEVELS) for k in ("s1", "s2")]
        for style in (Target(tuple(stats), (0.4, 0.6)), Regions(_two_regions(*content.shape[-2:]), (Target((stats[0],)), Target((stats[1],))))):
            ref = stylize(model, content, style, method=method, alpha=0.8, levels=LEVELS).cpu()
            assert _max_diff(_tiled(model, content, style, method), ref) <= ATOL[torch.float32]


def test_a_mask_region_no_feature_pixel_samples_is_found_and_warned_of(cd16x_dir, tmp_path):
    # A user review: a 4x4 region of a 96x96 mask took no style at stage 4 (grid 8) and nothing was said.
    from ultrastyle.core.styles import unsampled_labels
    from ultrastyle.runtime.batch import UnusedStyleWarning

    labels = np.zeros((96, 96), np.uint8)
    labels[:4, :4] = 1  # feature pixels of grid 8 sample (4, 4), (12, 12), ...: not rows/cols 0..3
    assert unsampled_labels(labels, [8]) == [1] and unsampled_labels(labels, [8, 4]) == [] and unsampled_labels(labels, [1]) == []
    labels[4, 4] = 2  # one pixel at a grid-8 centre is sampled
    assert unsampled_labels(labels, [8]) == [1]
    shrunk = np.zeros((12, 12), np.uint8)  # the mask resized to a small content: region 1 is gone, and still asked for
    assert unsampled_labels(shrunk, [8], present=np.array([0, 1])) == [1] and unsampled_labels(shrunk, [1], present=np.array([0, 1])) == [1]
    import ultrastyle

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.where(labels == 1, 255, 0).astype(np.uint8)).save(tmp_path / "m.png")
    styles = [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(2)]
    with ultrastyle.load(cd16x_dir, backend="torch") as s:
        with pytest.warns(UnusedStyleWarning, match=r"m.png: the region\(s\) of colour 255 are smaller than one feature pixel of stage\(s\) 4 at 96x96"):
            s.stylize(tmp_path / "c.png", styles, mask=tmp_path / "m.png", levels=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnusedStyleWarning)  # the region at the content's size: 4x4 grown to 40x40, sampled
            s.stylize(tmp_path / "c.png", styles, mask=tmp_path / "m.png", levels=4, content_size=960)
