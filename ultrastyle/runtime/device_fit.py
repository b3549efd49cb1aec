"""The WCT fit on the features' device: float64 eigendecompositions there, the style's half of it cached.

The reference fits ``A, b`` on the host (`core.transforms.wct_affine`): two
eigendecompositions per stage, the content's and the style's. On a GPU run
that host work sat on the critical path between a stage's encoder and its
decoder (measured on an H200, 22 MP: 12 ms a call, 24% of the cascade's host
time). Here:

- the content statistics (C + C² float64 numbers, the stage's one
  device-to-host copy) go back to the device and the content's
  ``(Σ + I)^-1/2`` is taken there with ``torch.linalg.eigh`` in float64;
- eigenvalues below `EIG_FLOOR` are masked to zero rather than dropped by a
  boolean index (which would wait for the device to count them);
- the style's ``Σ^1/2`` and mean are computed once per style statistics object
  and device and kept (a batch reuses them for every image), so one
  eigendecomposition per stage remains.

The result equals the host fit to float64 rounding (tests/test_torch_precision.py).
AdaIN has no eigendecomposition: its fit stays on the host and is copied over.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ultrastyle.core.styles import Affine, Target
from ultrastyle.core.transforms import EIG_FLOOR, FeatureStats, check_finite, fit_affine

FIT_PLACES = ("auto", "host", "device")
STYLE_CACHE_SIZE = 64  # style statistics (one per style and stage) whose Σ^1/2 is kept per device


def fit_on_device(fit_on: str, device: torch.device) -> bool:
    """Whether ``fit_on`` (``auto``: a CUDA device's features are fitted there; ``host``; ``device``) fits on ``device``."""
    if fit_on not in FIT_PLACES:
        raise ValueError(f"fit_on must be one of {', '.join(FIT_PLACES)}, got {fit_on!r}")
    return fit_on == "device" or (fit_on == "auto" and device.type == "cuda")


def sym_power_masked(cov: torch.Tensor, power: float) -> torch.Tensor:
    """``cov^power`` over the eigenvalues at or above `EIG_FLOOR`, the rest weighted 0 (no data-dependent shapes)."""
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals >= EIG_FLOOR
    scale = torch.where(keep, evals.clamp_min(EIG_FLOOR).pow(power), torch.zeros_like(evals))
    return (evecs * scale) @ evecs.T


def stats_on(stats: FeatureStats, device: torch.device) -> FeatureStats:
    """``stats`` with its sums on ``device`` (float64).

    To a CUDA device through page-locked copies, asynchronously: a copy from
    pageable memory would wait for the device's queue (PyTorch's caching host
    allocator keeps the page-locked block until the copy is done).
    """
    if device.type != "cuda":
        return FeatureStats(stats.count, stats.sum.to(device, torch.float64), stats.outer.to(device, torch.float64))

    def up(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cpu":
            return t.to(device, torch.float64)
        return t.to(torch.float64).pin_memory().to(device, non_blocking=True)

    return FeatureStats(stats.count, up(stats.sum), up(stats.outer))


class DeviceFitter:
    """WCT maps fitted on a device; keeps each style's colouring matrix and mean there (LRU, `STYLE_CACHE_SIZE`)."""

    def __init__(self, cache_size: int = STYLE_CACHE_SIZE) -> None:
        self.cache_size = cache_size
        # (id(style stats), device) -> (the stats object, kept so its id stays its own; Σ^1/2; mean)
        self._styles: OrderedDict[tuple[int, str], tuple[FeatureStats, torch.Tensor, torch.Tensor]] = OrderedDict()

    def style_colour(self, style: FeatureStats, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_s^1/2 (C, C), mean_s (C,))`` of a style's statistics, float64 on ``device``."""
        key = (id(style), str(device))
        hit = self._styles.get(key)
        if hit is not None and hit[0] is style:
            self._styles.move_to_end(key)
            return hit[1], hit[2]
        check_finite("style", style)  # once per style: its statistics are the host's
        on = stats_on(style, device)
        colour = sym_power_masked(on.covariance(), 0.5)
        self._styles[key] = (style, colour, on.mean)
        while len(self._styles) > self.cache_size:
            self._styles.popitem(last=False)
        return colour, on.mean

    def fit(
        self, target: Target, method: str, stage: int, content: FeatureStats, alpha: float, device: torch.device
    ) -> Affine:
        """`Target.fit` on ``device``: ``A`` (C, C) and ``b`` (C,), float64 there."""
        if method != "wct":  # AdaIN: no eigendecomposition; the host fit (with its checks), copied over
            a, b = target.fit(method, stage, content, alpha)
            return a.to(device), b.to(device)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if content.sum.device.type == "cpu":  # the stage's host copy: checked free (statistics left on a GPU would wait)
            check_finite("content", content)
        dev = stats_on(content, device)
        eye = torch.eye(content.channels, dtype=torch.float64, device=device)
        whiten = sym_power_masked(dev.covariance() + eye, -0.5)
        a = b = None
        for stats, w in zip(target.stats, target.weights):
            style = stats[stage]
            if style.channels != content.channels:
                fit_affine(method, content, style, alpha)  # raises the host fit's error
            colour, mean = self.style_colour(style, device)
            ai = colour @ whiten
            bi = mean - ai @ dev.mean
            ai, bi = alpha * ai + (1 - alpha) * eye, alpha * bi
            a, b = (w * ai, w * bi) if a is None else (a + w * ai, b + w * bi)
        assert a is not None and b is not None
        return a, b


DEVICE_FITTER = DeviceFitter()
