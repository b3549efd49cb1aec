"""core.resample: the streaming resize equals resize_long_side (F.interpolate, antialiased bicubic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrastyle.core.resample import RowResampler, aa_bicubic_weights, resized_size
from ultrastyle.io.images import resize_long_side


def _stream_resize(a: np.ndarray, nh: int, nw: int, rows_in: int, band: int) -> tuple[np.ndarray, int]:
    r = RowResampler(a.shape[0], a.shape[1], nh, nw, band=band)
    out = np.full((nh, nw, a.shape[2]), np.nan, np.float32)
    calls = 0
    for r0 in range(0, a.shape[0], rows_in):
        for o0, b in r.push(a[r0 : r0 + rows_in]):
            assert np.isnan(out[o0 : o0 + len(b)]).all(), "an output row was emitted twice"
            out[o0 : o0 + len(b)] = b
            calls += 1
    assert r.finished
    return out, calls


@pytest.mark.parametrize(("h", "w", "long_side", "rows_in", "band"), [
    (97, 150, 64, 29, 37),     # shrink, off-grid sizes, input bands not aligned with output bands
    (300, 211, 512, 16, 64),   # enlarge
    (1000, 700, 333, 256, 256),
    (13, 9, 40, 1, 5),         # one input row at a time
    (64, 64, 64, 7, 3),        # same size: identity weights
])  # fmt: skip
def test_streamed_resize_equals_interpolate(h: int, w: int, long_side: int, rows_in: int, band: int) -> None:
    a = np.random.default_rng(h * w).random((h, w, 3), dtype=np.float32)
    nh, nw = resized_size(h, w, long_side)
    ref = resize_long_side(torch.from_numpy(a).permute(2, 0, 1), long_side).permute(1, 2, 0).numpy()
    assert ref.shape == (nh, nw, 3)
    out, calls = _stream_resize(a, nh, nw, rows_in, band)
    err = np.abs(out - ref)
    assert err.max() <= 3e-5 and err.mean() <= 2e-6, (err.max(), err.mean())
    assert calls >= nh // band  # emitted in bands as the rows came, not once at the end


def test_weights_sum_to_one_and_stay_in_range() -> None:
    for n_in, n_out in ((1000, 7), (7, 1000), (5, 5), (1, 3), (3, 1)):
        wt = aa_bicubic_weights(n_in, n_out)
        assert np.allclose(wt.weights.sum(axis=1), 1.0)
        assert (wt.start >= 0).all() and (wt.end <= n_in).all() and (np.diff(wt.start) >= 0).all() and (np.diff(wt.end) >= 0).all()


def test_matrix_refuses_a_window_that_misses_inputs() -> None:
    wt = aa_bicubic_weights(100, 30)
    with pytest.raises(ValueError, match="not within"):
        wt.matrix(0, 10, int(wt.start[0]) + 1, int(wt.end[9]))


def test_resized_size_rounds_as_resize_long_side() -> None:
    for h, w, s in ((97, 150, 64), (150, 97, 64), (1, 5000, 100), (10, 10, 0), (10, 20, 20)):
        t = resize_long_side(torch.zeros(3, h, w), s)
        assert resized_size(h, w, s) == tuple(t.shape[1:])


def test_a_resize_to_one_pixel_wide_keeps_the_columns_content():
    """torch 2.13's CPU kernel gives one flat colour for an output 1 wide (1 high is right): a 300x1 column came out flat."""
    from ultrastyle.core.resample import aa_bicubic_weights
    from ultrastyle.io.images import resize_long_side

    img = torch.rand(3, 2000, 3, dtype=torch.float64)
    got = resize_long_side(img.float(), 512).double()
    wh = torch.from_numpy(aa_bicubic_weights(2000, 512).matrix(0, 512, 0, 2000)).double()
    ww = torch.from_numpy(aa_bicubic_weights(3, 1).matrix(0, 1, 0, 3)).double()
    want = torch.einsum("oh,chw,pw->cop", wh, img, ww).clamp(0, 1)
    assert got.shape == (3, 512, 1) and float((got - want).abs().max()) < 1e-5 and float(got.std()) > 0.02
    assert resize_long_side(img.float().transpose(1, 2), 512).shape == (3, 1, 512)  # 1 high: torch's own path
