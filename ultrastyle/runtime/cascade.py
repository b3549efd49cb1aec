"""The whole-image reference cascade: the semantics every fast path is checked against.

For each stage ``k`` in ``levels`` (default coarse to fine, 5..1): pad the
current image to the stage's grid (`core.padding`), encode to relu{k}_1,
fit the affine map from the content's and the style's global statistics,
apply it, decode, crop back. No clamping between stages.

On a CUDA device the fit runs there (`runtime.device_fit`: float64 ``eigh``
on the GPU, the style's half cached), so the only device-to-host copy inside
a stage is the content's C + C² statistics; ``fit_on="host"`` fits on the CPU
as before (the two agree to float64 rounding).
"""

from __future__ import annotations

import torch

from ultrastyle.core.arch import parse_levels  # noqa: F401 - re-exported: its home is torch-free for the command line
from ultrastyle.core.padding import pad_to_grid
from ultrastyle.core.styles import Regions, Style, apply_regions, as_style, identity_map, region_statistics
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.models.defaults import DEFAULT_ALPHA
from ultrastyle.runtime.backends.base import StageNetworks
from ultrastyle.runtime.device_fit import DEVICE_FITTER, fit_on_device

DEFAULT_LEVELS = (5, 4, 3, 2, 1)


@torch.inference_mode()
def style_statistics(model: StageNetworks, style: torch.Tensor, levels: tuple[int, ...]) -> dict[int, FeatureStats]:
    """Per-stage statistics of a style image (3, H, W); compute once, reuse for a whole batch."""
    x = style[None].to(model.device)
    return {k: FeatureStats.of(model.encode(k, pad_to_grid(x, model.arch.grid(k)))) for k in set(levels)}


@torch.inference_mode()
def stylize_stage(
    model: StageNetworks, image: torch.Tensor, stage: int, style: Style, *, method: str, alpha: float, fit_on: str = "auto"
) -> torch.Tensor:
    """One stage on the whole image: (1, 3, H, W) -> (1, 3, H, W); ``style`` and ``fit_on`` as in `stylize`."""
    h, w = image.shape[-2:]
    g = model.arch.grid(stage)
    f = model.encode(stage, pad_to_grid(image, g))
    target = as_style(style)
    if isinstance(target, Regions):
        labels = target.feature_labels(g, slice(0, f.shape[-2]), slice(0, f.shape[-1]))
        maps = target.fit(method, stage, region_statistics(f, labels, target.count), alpha)
        out = model.decode(stage, apply_regions(f, labels, maps), *identity_map(f.shape[1], f.device))
    else:
        stats = FeatureStats.of(f)  # the stage's one device-to-host copy: C + C² float64 numbers
        if fit_on_device(fit_on, f.device):
            a, b = DEVICE_FITTER.fit(target, method, stage, stats, alpha, f.device)
        else:
            a, b = target.fit(method, stage, stats, alpha)
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
    fit_on: str = "auto",
) -> torch.Tensor:
    """Stylize a content image (3, H, W) in [0, 1]; returns (3, H, W), not clamped.

    ``style``: per-stage statistics of one style (`style_statistics`), a
    weighted `Target` of several, or `Regions` (one target per mask label,
    the mask the content's size). ``fit_on``: where one style's (or a mix's)
    affine map is fitted: ``auto`` (on a CUDA device, there; else the host),
    ``host`` or ``device`` (`runtime.device_fit`). Regions fit on the host.
    """
    fit_on_device(fit_on, torch.device("cpu"))  # checks the value before any work
    target = as_style(style)
    if isinstance(target, Regions):
        target.check_size(*content.shape[-2:])
    x = content[None].to(model.device)
    for k in levels:
        x = stylize_stage(model, x, k, target, method=method, alpha=alpha, fit_on=fit_on)
    return x[0]
