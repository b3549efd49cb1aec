"""The whole-image reference cascade with the published CD 16x models."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ultrastyle.core.padding import pad_to_grid
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, parse_levels, style_statistics, stylize

# Written out by hand, independently of ultrastyle.core.arch: "P" = 2x2 max-pool, "U" = nearest 2x.
REF_ENCODERS = {
    1: "conv0 conv11",
    2: "conv0 conv11 conv12 P conv21",
    3: "conv0 conv11 conv12 P conv21 conv22 P conv31",
    4: "conv0 conv11 conv12 P conv21 conv22 P conv31 conv32 conv33 conv34 P conv41",
    5: "conv0 conv11 conv12 P conv21 conv22 P conv31 conv32 conv33 conv34 P conv41 conv42 conv43 conv44 P conv51",
}
REF_DECODERS = {
    1: "conv11",
    2: "conv21 U conv12 conv11",
    3: "conv31 U conv22 conv21 U conv12 conv11",
    4: "conv41 U conv34 conv33 conv32 conv31 U conv22 conv21 U conv12 conv11",
    5: "conv51 U conv44 conv43 conv42 conv41 U conv34 conv33 conv32 conv31 U conv22 conv21 U conv12 conv11",
}


def _ref_run(sd: dict, layers: str, x: torch.Tensor) -> torch.Tensor:
    for name in layers.split():
        if name == "P":
            x = F.max_pool2d(x, 2, 2)
        elif name == "U":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        elif name == "conv0":
            x = F.conv2d(x, sd["conv0.weight"], sd["conv0.bias"])
        else:  # every CD conv is reflect-pad 1 + 3x3 + ReLU, the decoders' last one included
            x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), sd[f"{name}.weight"], sd[f"{name}.bias"]))
    return x


def _ref_wct(cf: torch.Tensor, sf: torch.Tensor, alpha: float) -> torch.Tensor:
    """The original WCT (Li et al. 2017, PytorchWCT's whiten_and_color) in float64 with SVD."""
    c, n = cf.shape[1], cf.shape[2] * cf.shape[3]
    f = cf.reshape(c, n)
    s = sf.reshape(c, -1)
    fc = f - f.mean(1, keepdim=True)
    u, e, _ = torch.linalg.svd(fc @ fc.T / (n - 1) + torch.eye(c, dtype=f.dtype))
    k = int((e >= 1e-5).sum())
    whiten = u[:, :k] @ torch.diag(e[:k].pow(-0.5)) @ u[:, :k].T @ fc
    sm = s.mean(1, keepdim=True)
    sc = s - sm
    u, e, _ = torch.linalg.svd(sc @ sc.T / (s.shape[1] - 1))
    k = int((e >= 1e-5).sum())
    target = u[:, :k] @ torch.diag(e[:k].pow(0.5)) @ u[:, :k].T @ whiten + sm
    return (alpha * target + (1 - alpha) * f).reshape(cf.shape)


def _load_sd(path: Path) -> dict:
    return {k: v.double() for k, v in torch.load(path, map_location="cpu", weights_only=True)["model"].items()}


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir)


@pytest.fixture(scope="module")
def style_256(shared_dir):
    return resize_long_side(load_image(shared_dir / "images/style/cd_style_in1.jpg"), 256)


def test_cascade_matches_independent_float64_reference_within_2_over_255(cd16x, cd16x_dir, shared_dir, style_256):
    content = resize_long_side(load_image(shared_dir / "images/content/cd_content_in1.jpg"), 512)
    assert content.shape == (3, 512, 512)
    got = stylize(cd16x, content, style_statistics(cd16x, style_256, DEFAULT_LEVELS), alpha=0.6)

    x, s = content[None].double(), style_256[None].double()
    # The style is off the grid: pad it with the library's documented rule (tested in test_transforms).
    with torch.no_grad():
        for k in DEFAULT_LEVELS:
            enc, dec = _load_sd(cd16x_dir / f"{k}SE.pth"), _load_sd(cd16x_dir / f"{k}SD.pth")
            sf = _ref_run(enc, REF_ENCODERS[k], pad_to_grid(s, 2 ** (k - 1)))
            x = _ref_run(dec, REF_DECODERS[k], _ref_wct(_ref_run(enc, REF_ENCODERS[k], x), sf, 0.6))
    diff = (got.clamp(0, 1).double() - x[0].clamp(0, 1)).abs()
    print(f"cascade vs float64 reference: max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() <= 2 / 255, f"max abs diff {diff.max():.2e}, mean {diff.mean():.2e}"
    assert (got - content).abs().mean() > 0.05  # it did stylize


# Measured on the three CD content photos at 256 px, style cd_style_in1 (decode(encode(x)), alpha 0):
# lowest PSNR per stage 40.6, 29.8, 26.8, 23.6, 20.8 dB. Floors sit ~2.5 dB below.
PSNR_FLOOR = {1: 38.0, 2: 27.0, 3: 24.0, 4: 21.0, 5: 18.0}


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_stage_reconstruction_psnr_above_measured_floor(cd16x, shared_dir, style_256, stage):
    stats = style_statistics(cd16x, style_256, (stage,))
    for name in ("cd_content_in1.jpg", "cd_content_in2.jpg", "cd_content_in4.jpg"):
        content = resize_long_side(load_image(shared_dir / "images/content" / name), 256)
        out = stylize(cd16x, content, stats, alpha=0.0, levels=(stage,)).clamp(0, 1)
        psnr = -10 * torch.log10(((out - content) ** 2).mean())
        assert psnr > PSNR_FLOOR[stage], f"{name} stage {stage}: {psnr:.1f} dB"


@pytest.mark.parametrize("size", [(37, 45), (1, 40), (40, 1), (17, 130)])
def test_output_keeps_the_input_size_off_the_pooling_grid(cd16x, style_256, size):
    content = torch.rand(3, *size)
    for method in ("wct", "adain"):
        out = stylize(cd16x, content, style_statistics(cd16x, style_256, DEFAULT_LEVELS), method=method)
        assert out.shape == content.shape and torch.isfinite(out).all()


def test_parse_levels_accepts_stage_lists_and_rejects_others():
    assert parse_levels("5,4,3,2,1") == (5, 4, 3, 2, 1)
    assert parse_levels("3") == (3,)
    for bad in ("", "0", "6", "a,b"):
        with pytest.raises(ValueError, match=f"expected comma-separated stage numbers 1..5, got {bad!r}"):
            parse_levels(bad)
