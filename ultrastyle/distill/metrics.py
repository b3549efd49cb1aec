"""Reconstruction quality: PSNR and SSIM of images in [0, 1].

SSIM follows Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, computed per RGB channel on the valid region and
averaged, like ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
channel_axis=0, data_range=1)`` without padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of (…, H, W) images in [0, 1] (``inf`` if equal)."""
    mse = float(F.mse_loss(a.double().clamp(0, 1), b.double().clamp(0, 1)))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _window(size: int, sigma: float, channels: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of (C, H, W) or (N, C, H, W) images in [0, 1]; H, W >= ``window``."""
    x = a.double().clamp(0, 1)
    y = b.double().clamp(0, 1)
    if x.dim() == 3:
        x, y = x[None], y[None]
    c = x.shape[1]
    w = _window(window, sigma, c)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
