"""WCT / AdaIN affine maps: whitening, colouring, blending, mergeable statistics."""

import pytest
import torch
import torch.nn.functional as F

from ultrastyle.core.padding import pad_to_grid, padded_size, reflect_index
from ultrastyle.core.transforms import FeatureStats, apply_affine, fit_affine


def _features(c: int, h: int, w: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64) * scale
    base = torch.randn(c, h * w, generator=g, dtype=torch.float64)
    return (mix @ base + torch.randn(c, 1, generator=g, dtype=torch.float64)).reshape(1, c, h, w)


def _cov(f: torch.Tensor) -> torch.Tensor:
    x = f.reshape(f.shape[1], -1)
    x = x - x.mean(1, keepdim=True)
    return x @ x.T / (x.shape[1] - 1)


def test_stats_merge_over_pieces_equals_stats_of_the_whole():
    f = _features(8, 20, 30, 0)
    whole = FeatureStats.of(f)
    merged = FeatureStats.empty(8) + FeatureStats.of(f[..., :7, :]) + FeatureStats.of(f[..., 7:, :11]) + FeatureStats.of(f[..., 7:, 11:])
    assert merged.count == whole.count == 600
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole.covariance(), _cov(f))


def test_stats_kept_on_the_device_and_brought_over_once_equal_the_host_stats():
    # host=False leaves the sums where the features are (a GPU pass adds its tiles there); on the CPU the
    # same tensors, and to_host of a CPU sum is the object itself (no copy).
    f = _features(8, 20, 30, 1)
    kept = FeatureStats.of(f[..., :9, :], host=False) + FeatureStats.of(f[..., 9:, :], host=False)
    host = FeatureStats.of(f[..., :9, :]) + FeatureStats.of(f[..., 9:, :])
    assert kept.to_host() is kept and kept.count == host.count == 600
    assert torch.equal(kept.sum, host.sum) and torch.equal(kept.outer, host.outer)
    if torch.cuda.is_available():  # the same numbers from a GPU, brought over once
        g = FeatureStats.of(f.cuda(), host=False)
        assert g.sum.is_cuda and not g.to_host().sum.is_cuda
        torch.testing.assert_close(g.to_host().covariance(), FeatureStats.of(f).covariance(), rtol=1e-12, atol=1e-12)


def test_float32_features_merge_over_tiles_to_the_whole_images_statistics_in_float64_precision():
    # Float32 band GEMMs differed by 5e-7 of the covariance between tiles and the whole map (other
    # centres, other rounding), which five stages of whitening grew to 1.2e-4 in the output.
    f = (_features(24, 300, 410, 5) * 3 + 20).float()
    whole = FeatureStats.of(f)
    tiles = FeatureStats.of(f[..., :170, :]) + FeatureStats.of(f[..., 170:, :200]) + FeatureStats.of(f[..., 170:, 200:])
    scale = float(whole.covariance().abs().max())
    torch.testing.assert_close(tiles.covariance(), whole.covariance(), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(whole.covariance(), _cov(f.double()), rtol=0, atol=1e-12 * scale)


def test_float32_stats_keep_the_covariance_of_features_far_from_zero():
    """ReLU features sit far from zero in some channels: the band sums must not cancel (centre, then multiply)."""
    f64 = _features(8, 600, 700, 3) + 300.0  # mean ~300, spread ~3
    f32 = f64.float()[:, :, :, 5:-5]  # a strided view, as a tile's core is
    got = FeatureStats.of(f32)
    ref = _cov(f32.double())
    assert got.count == 600 * 690 and got.sum.dtype == torch.float64
    torch.testing.assert_close(got.covariance(), ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    torch.testing.assert_close(got.mean, f32.double().mean((0, 2, 3)), rtol=1e-12, atol=0)


def test_whitened_features_have_identity_covariance_plus_ridge():
    # alpha=1 with a zero-mean, identity-covariance style leaves only the whitening.
    content = _features(6, 40, 40, 1, scale=3.0)
    cs = FeatureStats.of(content)
    style = FeatureStats(count=cs.count, sum=torch.zeros(6, dtype=torch.float64),
                         outer=torch.eye(6, dtype=torch.float64) * (cs.count - 1))  # fmt: skip
    a, b = fit_affine("wct", cs, style, 1.0)
    white = apply_affine(content, a, b)
    # content covariance is regularised with +I, so whitened covariance is C (C + I)^-1.
    c = _cov(content)
    expected = c @ torch.linalg.inv(c + torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(_cov(white), expected, rtol=1e-8, atol=1e-8)
    assert white.reshape(6, -1).mean(1).abs().max() < 1e-10


def test_coloured_features_reproduce_style_covariance_and_mean():
    content = _features(5, 64, 64, 2, scale=3.0)
    style = _features(5, 50, 50, 3, scale=2.0)
    a, b = fit_affine("wct", FeatureStats.of(content), FeatureStats.of(style), 1.0)
    out = apply_affine(content, a, b)
    # Exactly: Cs^1/2 W Cc W Cs^1/2 with W = (Cc + I)^-1/2; -> Cs when the ridge is negligible.
    cc, cs = _cov(content), _cov(style)
    e, v = torch.linalg.eigh(cc + torch.eye(5, dtype=torch.float64))
    w = v @ torch.diag(e.rsqrt()) @ v.T
    e, v = torch.linalg.eigh(cs)
    r = v @ torch.diag(e.sqrt()) @ v.T
    torch.testing.assert_close(_cov(out), r @ w @ cc @ w @ r, rtol=1e-8, atol=1e-8)
    big = _features(5, 64, 64, 2, scale=100.0)  # the +I ridge becomes negligible
    out = apply_affine(big, *fit_affine("wct", FeatureStats.of(big), FeatureStats.of(style), 1.0))
    torch.testing.assert_close(_cov(out), cs, rtol=0.02, atol=0.02)
    torch.testing.assert_close(out.reshape(5, -1).mean(1), style.reshape(5, -1).mean(1), rtol=1e-8, atol=1e-8)


def test_alpha_zero_returns_content_features():
    content, style = _features(4, 10, 10, 4), _features(4, 12, 12, 5)
    for method in ("wct", "adain"):
        a, b = fit_affine(method, FeatureStats.of(content), FeatureStats.of(style), 0.0)
        torch.testing.assert_close(apply_affine(content, a, b), content)


def test_alpha_blends_linearly():
    content, style = _features(4, 10, 10, 6), _features(4, 12, 12, 7)
    cs, ss = FeatureStats.of(content), FeatureStats.of(style)
    full = apply_affine(content, *fit_affine("wct", cs, ss, 1.0))
    half = apply_affine(content, *fit_affine("wct", cs, ss, 0.3))
    torch.testing.assert_close(half, 0.3 * full + 0.7 * content)


def test_adain_matches_per_channel_mean_and_std_with_eps():
    content, style = _features(3, 30, 30, 8, scale=4.0), _features(3, 20, 20, 9)
    out = apply_affine(content, *fit_affine("adain", FeatureStats.of(content), FeatureStats.of(style), 1.0))
    c, s = content.reshape(3, -1), style.reshape(3, -1)
    ref = (s.var(1, keepdim=True) + 1e-5).sqrt() * (c - c.mean(1, keepdim=True)) / (c.var(1, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(out.reshape(3, -1), ref + s.mean(1, keepdim=True))


def test_singular_style_covariance_drops_small_eigenvalues():
    style = _features(4, 20, 20, 10)
    style[:, 3] = 0.0  # one dead channel: eigenvalue 0 must be dropped, not sqrt'ed into NaN
    a, b = fit_affine("wct", FeatureStats.of(_features(4, 20, 20, 11)), FeatureStats.of(style), 1.0)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert a[3].abs().max() < 1e-6


def test_fit_rejects_bad_arguments():
    s = FeatureStats.of(_features(4, 5, 5, 0))
    with pytest.raises(ValueError, match="unknown method"):
        fit_affine("gram", s, s, 0.5)
    with pytest.raises(ValueError, match="alpha"):
        fit_affine("wct", s, s, 1.5)
    with pytest.raises(ValueError, match="channels"):
        fit_affine("wct", s, FeatureStats.of(_features(3, 5, 5, 0)), 0.5)


def test_apply_affine_keeps_dtype_and_device(device):
    f = torch.rand(2, 4, 3, 5, device=device)
    out = apply_affine(f, torch.eye(4, dtype=torch.float64) * 2, torch.ones(4, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.device == f.device
    torch.testing.assert_close(out, 2 * f + 1)


@pytest.mark.parametrize("n,grid,expected", [(1, 1, 2), (2, 1, 2), (5, 1, 5), (17, 16, 32), (32, 16, 32), (33, 16, 48), (3, 4, 8)])
def test_padded_size_is_grid_multiple_and_at_least_two_cells(n, grid, expected):
    assert padded_size(n, grid) == expected


def test_reflect_index_equals_torch_reflect_pad_and_extends_beyond_it():
    x = torch.arange(7.0).view(1, 1, 7)
    ref = F.pad(x, (0, 5), mode="reflect")
    assert torch.equal(x[..., reflect_index(torch.arange(12), 7)], ref)
    assert reflect_index(torch.arange(8), 2).tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert reflect_index(torch.arange(3), 1).tolist() == [0, 0, 0]


def test_pad_to_grid_extends_bottom_right_only_and_handles_one_pixel_strips():
    x = torch.rand(1, 3, 1, 37)
    p = pad_to_grid(x, 16)
    assert p.shape == (1, 3, 32, 48)
    assert torch.equal(p[..., :1, :37], x)
    assert torch.equal(p[..., 5, :37], x[..., 0, :])


def test_the_identity_map_is_made_on_the_device_asked_for():
    """Made on the host, it was copied to the GPU (a wait on the GPU) for every tile of a masked pass."""
    from ultrastyle.core.styles import identity_map

    a, b = identity_map(4, "meta")
    assert a.device.type == b.device.type == "meta" and a.shape == (4, 4) and a.dtype == b.dtype == torch.float64
    a, b = identity_map(3)
    assert torch.equal(a, torch.eye(3, dtype=torch.float64)) and not b.any()


def test_features_that_are_not_finite_are_one_clear_error_not_a_black_image():
    """A model whose weights (or precision) overflow: AdaIN gave a black image reported done, WCT a LAPACK error."""
    from ultrastyle.core.transforms import FeatureStats, fit_affine

    good = FeatureStats.of(torch.rand(1, 4, 6, 6, dtype=torch.float64))
    bad = FeatureStats.of(torch.rand(1, 4, 6, 6, dtype=torch.float64).index_fill_(2, torch.tensor([0]), float("nan")))
    for method in ("wct", "adain"):
        with pytest.raises(ValueError, match="the content image's features are not finite"):
            fit_affine(method, bad, good, 0.6)
        with pytest.raises(ValueError, match="the style image's features are not finite"):
            fit_affine(method, good, bad, 0.6)
        a, b = fit_affine(method, good, good, 0.6)
        assert bool(torch.isfinite(a).all() and torch.isfinite(b).all())


def test_mix_weights_near_the_float_limit_are_weighed_not_refused_as_zero():
    from ultrastyle.core.styles import mix_weights

    assert mix_weights([1e308, 1e308]) == (0.5, 0.5) and mix_weights([3.0, 1.0]) == (0.75, 0.25)
