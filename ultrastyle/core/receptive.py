"""Receptive fields of stage networks, computed from their layer lists.

An output pixel of a stage network depends on a window of input pixels. With
pools and nearest upsampling the window depends on the pixel's phase on the
pooling grid, so every phase is walked and the worst case kept. Boundaries are
ignored (an infinite image); tiles that touch the image border start exactly
at it, so reflection padding there matches the whole-image run.
"""

from __future__ import annotations

from ultrastyle.core.arch import ArchSpec, Layer


def _back(layers: list[Layer], lo: int, hi: int) -> tuple[int, int]:
    """Interval of inputs [lo, hi] that outputs [lo, hi] of ``layers`` depend on (one axis)."""
    for layer in reversed(layers):
        if layer.kind == "conv":
            r = layer.kernel // 2
            lo, hi = lo - r, hi + r
        elif layer.kind == "pool":  # out i <- in 2i, 2i+1
            lo, hi = 2 * lo, 2 * hi + 1
        elif layer.kind == "up":  # out i <- in floor(i / 2)
            lo, hi = lo // 2, hi // 2
    return lo, hi


def _scale(layers: list[Layer]) -> int:
    """Input pixels per output pixel (pools count 2, upsamples 1/2)."""
    s = 1.0
    for layer in layers:
        s *= 2 if layer.kind == "pool" else 0.5 if layer.kind == "up" else 1
    return int(s) if s >= 1 else -int(round(1 / s))


def radius(layers: list[Layer], phases: int) -> int:
    """Largest distance, in input pixels, from an output pixel's footprint to an input it depends on.

    ``phases`` is the period of the network's alignment (its pooling grid).
    The footprint of output ``i`` is ``[i*s, i*s + s - 1]`` for a downsampling
    network of scale ``s``, ``floor(i / s)`` for an upsampling one.
    """
    s = _scale(layers)
    worst = 0
    for p in range(phases):
        lo, hi = _back(layers, p, p)
        if s >= 1:
            f_lo, f_hi = p * s, p * s + s - 1
        else:
            f_lo = f_hi = p // -s
        worst = max(worst, f_lo - lo, hi - f_hi)
    return worst


def needed_windows(layers: list[Layer], start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Per tensor (the input, then each layer's output), the window [a, b) that outputs [start, stop) need.

    One axis; ``size`` is the input's length. Windows are clipped to each
    tensor's extent and widened to the pooling grid of the layers that follow,
    so pools stay aligned; the last window is exactly [start, stop).
    """
    sizes, grids = [size], []
    for layer in layers:
        n = sizes[-1]
        sizes.append(n // 2 if layer.kind == "pool" else n * 2 if layer.kind == "up" else n)
    for i in range(len(layers) + 1):
        grids.append(2 ** sum(1 for l in layers[i:] if l.kind == "pool"))
    windows: list[tuple[int, int]] = [(start, stop)]
    lo, hi = start, stop - 1
    for i in range(len(layers) - 1, -1, -1):
        # What is needed propagates unaligned; the grid margin kept for the pools
        # may hold wrong values, since nothing needed depends on it.
        lo, hi = _back([layers[i]], lo, hi)
        g, n = grids[i], sizes[i]
        windows.append((max(0, lo // g * g), min(n, -(-(hi + 1) // g) * g)))
    return windows[::-1]


def encoder_radius(spec: ArchSpec, stage: int) -> int:
    """Input pixels each relu{k}_1 feature pixel reaches beyond its own grid cell."""
    return radius(spec.encoder_layers(stage), 1)


def decoder_radius(spec: ArchSpec, stage: int) -> int:
    """Feature pixels (at the relu{k}_1 resolution) an output pixel reaches beyond its own."""
    return radius(spec.decoder_layers(stage), spec.grid(stage))


def stage_radius(spec: ArchSpec, stage: int) -> int:
    """Input pixels an output pixel of encoder k + decoder k depends on, on either side."""
    layers = spec.encoder_layers(stage) + spec.decoder_layers(stage)
    return radius(layers, spec.grid(stage))


def round_up(n: int, grid: int) -> int:
    return -(-n // grid) * grid
