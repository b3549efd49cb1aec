"""Colour preservation (Gatys et al., "Preserving Color in Neural Artistic Style Transfer", 2016).

Two ways, both per pixel or per image, so they work at any size and on tiles:

- ``luminance``: the result keeps its luminance and takes the content's
  chroma. In full-range YCbCr (BT.601, as JPEG) the luminance column of the
  inverse transform is (1, 1, 1), so this is ``Y(result) + (content -
  Y(content))``: no colour-space round trip. Where that leaves [0, 1] (a
  saturated colour under a very bright or dark stylized luminance) the
  chroma is scaled towards grey just enough to fit: hue and luminance are
  kept, saturation gives way. Everywhere else the chroma is the content's.
- ``match``: the style image is recoloured before its statistics are taken,
  ``s' = A s + b`` with ``A = Σc^½ Σs^-½`` and ``b = μc − A μs`` (the
  content's and the style's RGB mean and covariance), so the stylization
  borrows the style's textures in the content's palette.
"""

from __future__ import annotations

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas
from ultrastyle.core.transforms import FeatureStats, sym_power

MODES = ("none", "luminance", "match")
LUMA = (0.299, 0.587, 0.114)
# Chroma rows of full-range BT.601 RGB -> YCbCr (offsets dropped: they cancel in differences).
CHROMA = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def luminance(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Y of (3, ...) RGB -> (...)."""
    return LUMA[0] * rgb[0] + LUMA[1] * rgb[1] + LUMA[2] * rgb[2]


def chroma(rgb: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """(Cb, Cr) of (3, ...) RGB -> (2, ...), centred on 0."""
    rows = [sum(k * rgb[i] for i, k in enumerate(row)) for row in CHROMA]
    return np.stack(rows) if isinstance(rgb, np.ndarray) else torch.stack(rows)


def keep_content_chroma(result: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the luminance of ``result`` (as displayed, clamped) with the chroma of ``content``."""
    y = luminance(result.clamp(0, 1))
    d = content - luminance(content)[None]  # the content's chroma as an RGB offset from grey
    # Largest s <= 1 with y + s*d inside [0, 1] in every channel.
    room = torch.where(d > 0, (1 - y)[None] / d.clamp(min=1e-12), torch.where(d < 0, -y[None] / d.clamp(max=-1e-12), 1.0))
    s = room.amin(0).clamp(0, 1)
    return (y[None] + s[None] * d).clamp_(0, 1)


def keep_content_chroma_canvas(result: Canvas, content: Canvas, band: int = 256) -> None:
    """`keep_content_chroma` in place on a canvas, band by band (any size, RAM or disk)."""
    if result.shape != content.shape:
        raise ValueError(f"result canvas {result.shape} and content canvas {content.shape} differ")
    _, h, _ = result.shape
    for r in range(0, h, band):
        r1 = min(h, r + band)
        out = keep_content_chroma(torch.from_numpy(result.rows_band(r, r1)), torch.from_numpy(content.rows_band(r, r1)))
        result.write(r, 0, out.numpy())


def rgb_statistics(image: torch.Tensor | Canvas, band: int = 256) -> FeatureStats:
    """Mean and covariance of an image's RGB values: (3, H, W) tensor or canvas."""
    if isinstance(image, torch.Tensor):
        return FeatureStats.of(image)
    _, h, _ = image.shape
    stats = FeatureStats.empty(3)
    for r in range(0, h, band):
        stats = stats + FeatureStats.of(torch.from_numpy(image.rows_band(r, min(h, r + band))))
    return stats


def _colour_covariance(stats: FeatureStats) -> torch.Tensor:
    # A one-pixel image has one colour and no spread: zero covariance, not an error.
    if stats.count < 2:
        return torch.zeros_like(stats.outer)
    return stats.covariance()


def match_colors(style: torch.Tensor, content: FeatureStats) -> torch.Tensor:
    """The style image (3, H, W) recoloured to the content's RGB mean and covariance, clamped to [0, 1]."""
    s = rgb_statistics(style)
    a = sym_power(_colour_covariance(content), 0.5) @ sym_power(_colour_covariance(s), -0.5)
    b = content.mean - a @ s.mean
    out = torch.einsum("ij,jhw->ihw", a.float(), style) + b.float()[:, None, None]
    return out.clamp_(0, 1)
