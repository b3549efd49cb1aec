"""WCT and AdaIN as one affine map per pixel, fitted from global statistics.

Both transforms become ``f_hat = A f + b`` once the content and style feature
statistics are known (docs/design.md), with the blend ``alpha * f_hat + (1 - alpha) * f``
folded into ``A`` and ``b``. Statistics are float64 sums, mergeable across
tiles, so a tiled run fits the same map as a whole-image run.

Semantics follow the original WCT (Li et al. 2017) and pytorch-AdaIN:
content covariance ``/(N-1) + I``, style covariance ``/(N-1)``, eigenvalues
below 1e-5 dropped; AdaIN's std is ``sqrt(unbiased var + 1e-5)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

EIG_FLOOR = 1e-5
ADAIN_EPS = 1e-5
SUBSAMPLED_CENTRE_PIXELS = 64 * 4096  # maps at least this large are centred on a 1/64 sample
CPU_BAND_BYTES = 1 << 20  # float64 band copies on the CPU stay this small (`FeatureStats.of`)


@dataclass
class FeatureStats:
    """Count, Σf (C,) and Σffᵀ (C, C) of a feature map, float64 on the CPU (or, summed over a pass, on its device: `to_host`)."""

    count: int
    sum: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, channels: int, device: torch.device | None = None) -> FeatureStats:
        """No pixels yet; on ``device`` (default the CPU) for a sum over tiles kept there (`of` with ``host=False``)."""
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0, z, torch.zeros(channels, channels, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, features: torch.Tensor, chunk: int = 1 << 13, *, host: bool = True) -> FeatureStats:
        """Statistics of ``features`` (N, C, H, W) or (C, H, W); every pixel of every item counts.

        ``host=False``: the sums stay on the features' device, for a caller
        that adds up many tiles there and copies the total once (`to_host`):
        a copy per tile would make the host wait for each tile's compute.

        Each row band of about ``chunk`` pixels is centred near the mean
        (which keeps Σffᵀ free of cancellation), copied from the (often
        strided) tile view into one float64 buffer and multiplied there.
        Float32 GEMMs were 2.5-4x faster, but their rounding (5e-7 of the
        covariance) differs between a tile's centre and the whole image's,
        and the whitening of five stages amplified it: a 256x1200 strip came
        out 1.2e-4 from its whole-image run (0 in float64), a CUDA cascade
        1.9e-3 from the float64 one. Float64 costs ~0.1 s per 2 MP image
        here (2%). The GEMMs run where the features are; only C + C²
        numbers come back.
        """
        f = features.detach()
        f4 = f if f.dim() == 4 else f[None]
        nb, c, h, w = f4.shape
        n = nb * h * w
        # The centre only has to be close to the mean: the products of f - centre carry
        # n |mean - centre|² that the corrections below cancel, so a far centre loses precision.
        # Large maps: the mean of every 8th row and column (a 64th of a pass over the strided view,
        # still >= 4096 samples); small ones: the mean itself (one sampled ReLU pixel can be far off).
        sample = f4[:, :, ::8, ::8] if n >= SUBSAMPLED_CENTRE_PIXELS else f4
        s = sample.mean((0, 2, 3), dtype=torch.float64) if n else torch.zeros(c, dtype=torch.float64, device=f.device)
        residual = torch.zeros(c, dtype=torch.float64, device=f.device)  # Σ(f - s)
        outer = torch.zeros(c, c, dtype=torch.float64, device=f.device)  # Σ(f - s)(f - s)ᵀ
        if f.device.type != "cpu":  # fewer, larger launches: bands of up to 64 MiB
            chunk = max(chunk, (64 << 20) // (c * 8))
        else:  # 40 MP, ONNX Runtime: two new 8 MB copies per band peaked at 1.94-1.95 GiB, one 1 MiB buffer 1.91
            chunk = min(chunk, CPU_BAND_BYTES // (c * 8))
        step = max(1, chunk // max(1, nb * w))  # rows per band
        buf = torch.empty(c, nb, min(step, h), w, dtype=torch.float64, device=f.device)  # one buffer for all bands
        for r in range(0, h, step):
            rows = min(step, h - r)
            band = buf[:, :, :rows]
            band.copy_(f4[:, :, r : r + rows].transpose(0, 1))
            band -= s.view(c, 1, 1, 1)
            part = band.reshape(c, -1)
            residual += part.sum(1, dtype=torch.float64)
            outer += part @ part.T
        total = residual + n * s
        # Σffᵀ = Σ(f-s)(f-s)ᵀ + s Σ(f-s)ᵀ + Σ(f-s) sᵀ + n s sᵀ
        outer += torch.outer(s, residual) + torch.outer(residual, s) + n * torch.outer(s, s)
        stats = cls(n, total, outer)
        return stats.to_host() if host else stats

    def to_host(self) -> FeatureStats:
        """These statistics with their sums on the CPU (a device-to-host copy where they are elsewhere; else themselves)."""
        if self.sum.device.type == "cpu":
            return self
        return FeatureStats(self.count, self.sum.cpu(), self.outer.cpu())

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    @property
    def channels(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance (C, C)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 feature pixels, got {self.count}")
        m = self.mean
        return (self.outer - self.count * torch.outer(m, m)) / (self.count - 1)


def sym_power(cov: torch.Tensor, power: float) -> torch.Tensor:
    """``cov^power`` over the eigenvalues at or above `EIG_FLOOR` (the rest dropped)."""
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals >= EIG_FLOOR
    v = evecs[:, keep]
    return (v * evals[keep].pow(power)) @ v.T


def wct_affine(content: FeatureStats, style: FeatureStats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended WCT map: returns ``A`` (C, C) and ``b`` (C,), float64."""
    eye = torch.eye(content.channels, dtype=torch.float64)
    whiten = sym_power(content.covariance() + eye, -0.5)
    color = sym_power(style.covariance(), 0.5)
    a = color @ whiten
    b = style.mean - a @ content.mean
    return alpha * a + (1 - alpha) * eye, alpha * b


def adain_affine(content: FeatureStats, style: FeatureStats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Blended AdaIN map (diagonal ``A``): returns ``A`` (C, C) and ``b`` (C,), float64."""
    sc = (content.covariance().diagonal() + ADAIN_EPS).sqrt()
    ss = (style.covariance().diagonal() + ADAIN_EPS).sqrt()
    scale = ss / sc
    b = style.mean - scale * content.mean
    return torch.diag(alpha * scale + (1 - alpha)), alpha * b


AffineFit = Callable[[FeatureStats, FeatureStats, float], tuple[torch.Tensor, torch.Tensor]]
METHODS: dict[str, AffineFit] = {"wct": wct_affine, "adain": adain_affine}


def fit_affine(method: str, content: FeatureStats, style: FeatureStats, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if content.channels != style.channels:
        raise ValueError(f"content has {content.channels} channels, style {style.channels}")
    check_finite("content", content)
    check_finite("style", style)
    return METHODS[method](content, style, alpha)


def check_finite(what: str, stats: FeatureStats) -> None:
    """ValueError naming the ``what`` image where its statistics hold inf or NaN: else a black image reported done, or
    eigh's LAPACK error. Reads the sums where they are (on a GPU, a wait for it)."""
    if not (bool(torch.isfinite(stats.sum).all()) and bool(torch.isfinite(stats.outer).all())):
        raise ValueError(f"the {what} image's features are not finite (inf or NaN): the model's weights, or its "
                         "precision, overflowed")  # fmt: skip


def apply_affine(features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A f + b`` per pixel: features (N, C, H, W) -> (N, C, H, W), in the features' dtype and device."""
    # A GEMM on the (N, C, H*W) view: unlike a 1x1 convolution it needs no
    # blocked-layout copies of the features, so a tile's peak memory stays lower.
    n, c, h, w = features.shape
    a = a.to(features.device, features.dtype)
    out = torch.matmul(a, features.reshape(n, c, h * w))
    return out.add_(b.to(features.device, features.dtype)[:, None]).view(n, c, h, w)
