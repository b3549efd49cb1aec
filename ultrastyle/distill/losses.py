"""Differentiable losses of Collaborative Distillation and AdaIN training.

Every "||a - b||²" here is a mean squared error (``F.mse_loss``, mean over all
elements), as in the CD reference code, so loss weights do not depend on the
crop size or the layer width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ultrastyle.core.transforms import ADAIN_EPS

Taps = Mapping[str, torch.Tensor]


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def mean_std(feat: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise mean and std of (N, C, H, W) features, each (N, C, 1, 1).

    The variance is unbiased and ``eps`` is added before the square root, as
    in AdaIN's reference implementation.
    """
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1)
    return flat.mean(2).reshape(n, c, 1, 1), (flat.var(2) + eps).sqrt().reshape(n, c, 1, 1)


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """AdaIN: content features renormalised to the style's channel mean and std (N, C, H, W)."""
    cm, cs = mean_std(content, eps)
    sm, ss = mean_std(style, eps)
    return (content - cm) / cs * ss + sm


def perceptual_loss(found: Taps, target: Taps) -> torch.Tensor:
    """Σ_b ||found_b − target_b||² over the taps both hold (relu1_1 .. relu{k}_1)."""
    return sum((mse(found[name], target[name].detach()) for name in target), torch.zeros(()))


def style_loss(found: Taps, style: Taps) -> torch.Tensor:
    """AdaIN's style loss: Σ_b ||μ(found_b) − μ(style_b)||² + ||σ(found_b) − σ(style_b)||²."""
    total = torch.zeros(())
    for name, s in style.items():
        fm, fs = mean_std(found[name])
        sm, ss = mean_std(s.detach())
        total = total + mse(fm, sm) + mse(fs, ss)
    return total
