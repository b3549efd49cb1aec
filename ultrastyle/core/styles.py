"""What one output is stylized towards: one style, a weighted mix of styles, or one style per mask region.

Every case stays an affine map per feature pixel (docs/design.md), so tiled
and whole-image runs still agree:

- `Target`: styles with weights ``w_i`` (summing to 1). The transformed
  features are blended, ``Σ w_i T_i(f)``, as in the AdaIN and WCT papers'
  style interpolation; since each ``T_i`` is affine that is one map,
  ``A = Σ w_i A_i``, ``b = Σ w_i b_i``. One style is a `Target` of weight 1.
- `Regions`: a label image the size of the content; label ``l`` gets
  ``targets[l]``. Content statistics are accumulated per region, each region
  fits its own map, and each feature pixel takes its region's map. A feature
  pixel of stage grid ``g`` belongs to the label at the centre of its
  ``g x g`` cell of the grid-padded image (`feature_labels`), the same rule
  whole and tiled. A region with fewer than two feature pixels at a stage
  (small regions vanish at coarse stages) fits its map from the whole
  image's content statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ultrastyle.core.padding import reflect_index
from ultrastyle.core.transforms import FeatureStats, fit_affine

StageStats = Mapping[int, FeatureStats]
Affine = tuple[torch.Tensor, torch.Tensor]


def mix_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Validate style weights (one per style, >= 0, not all zero) and normalise them to sum to 1."""
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("a style mix needs at least one style")
    bad = [x for x in w if not np.isfinite(x) or x < 0]
    if bad:
        raise ValueError(f"style weights must be finite and >= 0, got {bad[0]:g}")
    top = max(w)
    if top <= 0:
        raise ValueError("style weights are all zero; give at least one positive weight")
    total = sum(x / top for x in w)  # scaled by the largest first: weights near 1e308 sum to inf, and then all to 0
    return tuple(x / top / total for x in w)


@dataclass(frozen=True)
class Target:
    """Per-stage statistics of one or more styles, with weights summing to 1."""

    stats: tuple[StageStats, ...]
    weights: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if len(self.stats) != len(self.weights):
            raise ValueError(f"{len(self.stats)} styles but {len(self.weights)} weights: give one weight per style")
        object.__setattr__(self, "weights", mix_weights(self.weights))

    def fit(self, method: str, stage: int, content: FeatureStats, alpha: float) -> Affine:
        """The blended map ``(A (C, C), b (C,))`` for content statistics ``content``, float64."""
        a = b = None
        for stats, w in zip(self.stats, self.weights):
            ai, bi = fit_affine(method, content, stats[stage], alpha)
            a, b = (w * ai, w * bi) if a is None else (a + w * ai, b + w * bi)
        assert a is not None and b is not None
        return a, b


@dataclass(frozen=True)
class Regions:
    """One `Target` per label: ``labels`` (H, W) integer array of indices into ``targets``, the content's size."""

    labels: np.ndarray
    targets: tuple[Target, ...]

    def __post_init__(self) -> None:
        if self.labels.ndim != 2:
            raise ValueError(f"region labels must be (H, W), got shape {self.labels.shape}")
        top = int(self.labels.max(initial=0))
        if top >= len(self.targets):
            raise ValueError(f"label {top} has no style: {len(self.targets)} styles for labels 0..{top}")

    @property
    def count(self) -> int:
        return len(self.targets)

    def check_size(self, height: int, width: int) -> None:
        if self.labels.shape != (height, width):
            h, w = self.labels.shape
            raise ValueError(f"the mask is {w}x{h} but the content is {width}x{height}; give a mask of the content's size")

    def feature_labels(self, grid: int, rows: slice, cols: slice) -> torch.Tensor:
        """Labels (h, w) int64 of feature pixels ``rows`` x ``cols`` of a stage with ``grid``.

        Feature pixel ``i`` covers padded-image pixels ``i*g .. i*g+g-1``; it
        takes the label at ``i*g + g//2``, mirrored into the image like the
        grid padding (`core.padding`).
        """
        h, w = self.labels.shape
        r = reflect_index(torch.arange(rows.start, rows.stop) * grid + grid // 2, h).numpy()
        c = reflect_index(torch.arange(cols.start, cols.stop) * grid + grid // 2, w).numpy()  # as `unsampled_labels`
        return torch.from_numpy(self.labels[np.ix_(r, c)].astype(np.int64))

    def fit(self, method: str, stage: int, content: Sequence[FeatureStats], alpha: float) -> list[Affine]:
        """One map per region from per-region content statistics (the whole image's where a region is too small)."""
        total = content[0]
        for s in content[1:]:
            total = total + s
        return [t.fit(method, stage, s if s.count >= 2 else total, alpha) for t, s in zip(self.targets, content)]


def unsampled_labels(labels: np.ndarray, grids: Sequence[int], present: np.ndarray | None = None) -> list[int]:
    """Labels of ``labels`` (H, W) that no feature pixel of any stage with one of ``grids`` samples (`Regions.feature_labels`'
    rule): regions smaller than a cell there, whose style is never applied. ``present``: the labels to look for (default:
    those of ``labels``; a mask's own, when ``labels`` is it resized and may have lost some). Reads ``H W / g²`` labels per grid."""
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=1)) if present is None else present
    h, w = labels.shape
    seen: set[int] = set()
    for g in sorted(set(grids)):
        if g == 1:  # every pixel is a feature pixel
            seen.update(np.flatnonzero(np.bincount(labels.ravel())).tolist())
            continue
        r = reflect_index(torch.arange(-(-h // g)) * g + g // 2, h).numpy()
        c = reflect_index(torch.arange(-(-w // g)) * g + g // 2, w).numpy()
        seen.update(np.flatnonzero(np.bincount(labels[np.ix_(r, c)].ravel())).tolist())
    return [int(x) for x in present if int(x) not in seen]


Style = StageStats | Target | Regions


def as_style(style: Style) -> Target | Regions:
    """A plain per-stage statistics dict is one style of weight 1."""
    if isinstance(style, (Target, Regions)):
        return style
    return Target((style,))


def region_indices(labels: torch.Tensor, count: int, device: torch.device) -> list[torch.Tensor | None]:
    """Per label ``0..count-1`` of host ``labels`` (h, w): the flat pixel indices on ``device``, None where it has none.

    Found on the host, where the labels are: selecting on the device by a
    boolean mask would wait for the device to count the pixels.
    """
    lab = labels.reshape(-1)
    out: list[torch.Tensor | None] = []
    for region in range(count):
        idx = (lab == region).nonzero().squeeze(1)
        if not idx.numel():
            out.append(None)
        elif device.type == "cpu":
            out.append(idx)
        else:  # page-locked, so the copy is queued without waiting
            out.append(idx.pin_memory().to(device, non_blocking=True))
    return out


def region_statistics(features: torch.Tensor, labels: torch.Tensor, count: int, *, host: bool = True) -> list[FeatureStats]:
    """Statistics of ``features`` (1, C, h, w) per label of host ``labels`` (h, w): ``count`` entries.

    ``host=False``: the sums stay on the features' device (`FeatureStats.of`).
    """
    c = features.shape[1]
    flat = features[0].reshape(c, -1)
    out = []
    for idx in region_indices(labels, count, features.device):
        if idx is None:
            out.append(FeatureStats.empty(c, None if host else features.device))
        else:
            out.append(FeatureStats.of(flat.index_select(1, idx)[None, :, None], host=host))
    return out


def apply_regions(features: torch.Tensor, labels: torch.Tensor, maps: Sequence[Affine]) -> torch.Tensor:
    """Each feature pixel through its region's map: (1, C, h, w) -> (1, C, h, w), in the features' dtype."""
    _, c, h, w = features.shape
    flat = features[0].reshape(c, -1)
    out = torch.empty_like(flat)
    for idx, (a, b) in zip(region_indices(labels, len(maps), features.device), maps):
        if idx is not None:
            a_, b_ = a.to(features.device, features.dtype), b.to(features.device, features.dtype)
            out.index_copy_(1, idx, a_ @ flat.index_select(1, idx) + b_[:, None])
    return out.view(1, c, h, w)


def identity_map(channels: int, device: torch.device | str | None = None) -> Affine:
    """``A = I``, ``b = 0``: for decoders fed features that were already transformed. Made on ``device`` (a GPU's: no
    host copy, which would wait on the GPU, each time a tile uses it)."""
    return torch.eye(channels, dtype=torch.float64, device=device), torch.zeros(channels, dtype=torch.float64, device=device)
