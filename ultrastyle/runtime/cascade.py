"""The whole-image reference cascade: the semantics every fast path is checked against.

For each stage ``k`` in ``levels`` (default coarse to fine, 5..1): pad the
current image to the stage's grid (`core.padding`), encode to relu{k}_1,
fit the affine map from the content's and the style's global statistics,
apply it, decode, crop back. No clamping between stages.
"""

from __future__ import annotations

import torch

from ultrastyle.core.padding import pad_to_grid
from ultrastyle.core.styles import Regions, Style, apply_regions, as_style, identity_map, region_statistics
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.models.defaults import DEFAULT_ALPHA
from ultrastyle.runtime.backends.base import StageNetworks

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


def parse_levels(text: str) -> tuple[int, ...]:
    """``"5,4,3,2,1"`` -> (5, 4, 3, 2, 1), with a clear error for anything else."""
    try:
        levels = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ValueError(f"levels must be comma-separated stage numbers 1..5, got {text!r}") from None
    if not levels or any(k not in (1, 2, 3, 4, 5) for k in levels):
        raise ValueError(f"levels must be comma-separated stage numbers 1..5, got {text!r}")
    return levels


@torch.inference_mode()
def style_statistics(model: StageNetworks, style: torch.Tensor, levels: tuple[int, ...]) -> dict[int, FeatureStats]:
    """Per-stage statistics of a style image (3, H, W); compute once, reuse for a whole batch."""
    x = style[None].to(model.device)
    return {k: FeatureStats.of(model.encode(k, pad_to_grid(x, model.arch.grid(k)))) for k in set(levels)}


@torch.inference_mode()
def stylize_stage(
    model: StageNetworks, image: torch.Tensor, stage: int, style: Style, *, method: str, alpha: float
) -> torch.Tensor:
    """One stage on the whole image: (1, 3, H, W) -> (1, 3, H, W); ``style`` as in `stylize`."""
    h, w = image.shape[-2:]
    g = model.arch.grid(stage)
    f = model.encode(stage, pad_to_grid(image, g))
    target = as_style(style)
    if isinstance(target, Regions):
        labels = target.feature_labels(g, slice(0, f.shape[-2]), slice(0, f.shape[-1]))
        maps = target.fit(method, stage, region_statistics(f, labels, target.count), alpha)
        out = model.decode(stage, apply_regions(f, labels, maps), *identity_map(f.shape[1]))
    else:
        a, b = target.fit(method, stage, FeatureStats.of(f), alpha)
        out = model.decode(stage, f, a, b)
    return out[..., :h, :w]


def stylize(
    model: StageNetworks,
    content: torch.Tensor,
    style: Style,
    *,
    method: str = "wct",
    alpha: float = DEFAULT_ALPHA,
    levels: tuple[int, ...] = DEFAULT_LEVELS,
) -> torch.Tensor:
    """Stylize a content image (3, H, W) in [0, 1]; returns (3, H, W), not clamped.

    ``style``: per-stage statistics of one style (`style_statistics`), a
    weighted `Target` of several, or `Regions` (one target per mask label,
    the mask the content's size).
    """
    target = as_style(style)
    if isinstance(target, Regions):
        target.check_size(*content.shape[-2:])
    x = content[None].to(model.device)
    for k in levels:
        x = stylize_stage(model, x, k, target, method=method, alpha=alpha)
    return x[0]
