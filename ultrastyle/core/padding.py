"""The one rule for sizes off the pooling grid, shared by whole-image and tiled runs.

Stage ``k`` needs height and width that are multiples of its grid ``g = 2^(k-1)``
and at least ``2g`` (so the deepest reflection pad has two pixels to mirror).
The image is extended at its bottom/right edge by mirror reflection
(repeated, so even a 1-pixel strip can be extended), the stage runs on the
padded image, and its output is cropped back to the input size. The padded
pixels take part in the content statistics like any other.
"""

from __future__ import annotations

import torch


def padded_size(n: int, grid: int) -> int:
    """Smallest multiple of ``grid`` that is >= ``n`` and >= ``2 * grid``."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    return max(-(-n // grid), 2) * grid


def reflect_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Map indices in ``[0, inf)`` onto ``[0, n)`` by mirror reflection without edge repeat.

    Equals ``F.pad(mode="reflect")`` where that is defined, and keeps reflecting
    for pads longer than the image (period ``2(n-1)``); n == 1 repeats the pixel.
    """
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    r = idx.remainder(period)
    return torch.where(r < n, r, period - r)


def pad_to_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """x (..., H, W) -> (..., Hp, Wp) with `padded_size` on each axis, extended at bottom/right."""
    h, w = x.shape[-2:]
    hp, wp = padded_size(h, grid), padded_size(w, grid)
    if (hp, wp) == (h, w):
        return x
    rows = reflect_index(torch.arange(hp, device=x.device), h)
    cols = reflect_index(torch.arange(wp, device=x.device), w)
    return x.index_select(-2, rows).index_select(-1, cols)
