"""Memory planner: activation bytes per pixel of each stage network, and tile sizes from a budget.

The estimate follows how the eager CPU runtime holds tensors: while a 3x3
convolution runs, its input, its reflection-padded copy, oneDNN's blocked-layout
copy of that, the blocked output and the plain output are alive together
(measured: tests/test_memory_planner.py). The peak over the encoder, the affine
map and the decoder, per pixel of the tile's region, times the region's area,
is the tile's working memory.
"""

from __future__ import annotations

import re

from ultrastyle.core.arch import ArchSpec, Layer

# The memory budget of a run unless told (stylize, optimize, the planner), as a user writes it: binary units.
DEFAULT_BUDGET = "2GB"

UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40, "tb": 2**40}


def parse_bytes(text: str) -> int:
    """``"2GB"`` -> 2147483648 (binary units; ``KiB``/``MiB``/``GiB`` accepted too)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 512MB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).replace("i", "")])


def _blocked(channels: int) -> int:
    """Channels of oneDNN's blocked layout (nChw16c): rounded up to 16."""
    return -(-channels // 16) * 16


def _peak_per_pixel(layers: list[Layer], channels: int, scale: float, bytes_per_value: int) -> tuple[float, int, float]:
    """Peak live bytes per input pixel over ``layers``; returns (peak, out channels, out scale)."""
    peak = 0.0
    for layer in layers:
        area = 1.0 / (scale * scale)
        if layer.kind == "conv":
            # input, padded input, blocked copy of it, blocked output, plain output
            src = channels if layer.kernel > 1 else 0
            live = (channels + src + _blocked(channels) + _blocked(layer.cout) + layer.cout) * area
            channels = layer.cout
        elif layer.kind == "pool":
            live = channels * area * 2.5
            scale *= 2
        else:  # nearest 2x upsampling
            live = channels * area * 5
            scale /= 2
        peak = max(peak, live * bytes_per_value)
    return peak, channels, scale


def stage_bytes_per_pixel(spec: ArchSpec, stage: int, bytes_per_value: int = 4) -> float:
    """Peak activation bytes per pixel of the tile region for encoder k -> A f + b -> decoder k."""
    enc, c, s = _peak_per_pixel(spec.encoder_layers(stage), 3, 1.0, bytes_per_value)
    affine = 2 * c / (s * s) * bytes_per_value  # features and their transformed copy (a GEMM)
    dec, _, _ = _peak_per_pixel(spec.decoder_layers(stage), c, s, bytes_per_value)
    # The tile's input stays referenced while the stage runs.
    return max(enc, affine, dec) + 3 * bytes_per_value


def region_side_for_budget(spec: ArchSpec, stage: int, budget: int, bytes_per_value: int = 4, factor: float = 1.0) -> int:
    """Largest square region side (on the stage's grid) whose activations fit ``budget`` bytes.

    ``factor`` scales the estimate for a backend that holds more than eager PyTorch.
    """
    side = int((budget / (factor * stage_bytes_per_pixel(spec, stage, bytes_per_value))) ** 0.5)
    return side // spec.grid(stage) * spec.grid(stage)


def core_for_budget(
    spec: ArchSpec, stage: int, budget: int, halo: int, bytes_per_value: int = 4, factor: float = 1.0
) -> int:
    """Core side of a square tile whose region (core + 2 halo) fits ``budget``.

    Raises ValueError naming the smallest budget that works when none fits.
    """
    grid = spec.grid(stage)
    core = region_side_for_budget(spec, stage, budget, bytes_per_value, factor) - 2 * halo
    if core < 2 * grid:
        need = (2 * grid + 2 * halo) ** 2 * factor * stage_bytes_per_pixel(spec, stage, bytes_per_value)
        raise ValueError(
            f"a memory budget of {budget / 2**20:.0f} MiB is too small for stage {stage} (halo {halo} px); "
            f"it needs at least {need / 2**20:.0f} MiB: raise the memory budget or set a fixed tile size"
        )
    return core
