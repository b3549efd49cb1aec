"""Antialiased bicubic resampling as explicit weights, so an image can be resized a band of rows at a time.

`resize_long_side` (``F.interpolate(mode="bicubic", antialias=True)``) needs
the whole image in RAM. The same filter written as per-axis weight tables
(`aa_bicubic_weights`) gives each output row as a weighted sum of a few
consecutive input rows, so a streaming reader keeps only that window. The
weights follow PyTorch's CPU kernel (aten/src/ATen/native/cpu/UpSampleKernel.cpp,
``_compute_index_ranges_weights`` with the antialias bicubic filter, a = -0.5,
the same as Pillow's): support 2 * scale when shrinking, 2 when enlarging,
centres at ``scale * (i + 0.5)``, each row of weights normalised to sum 1.
The results equal ``F.interpolate``'s to float32 rounding (tests/test_resample.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_A = -0.5  # the antialias bicubic filter's parameter (PyTorch and Pillow)


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2) * x - (_A + 3)) * x * x + 1
    far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@dataclass(frozen=True)
class AxisWeights:
    """Output index i reads input indices ``start[i] <= j < end[i]`` with ``weights[i, j - start[i]]``.

    ``start``, ``end``: (out,) int64, both non-decreasing; ``weights``: (out, taps) float64, zero past ``end``.
    """

    in_size: int
    start: np.ndarray
    end: np.ndarray
    weights: np.ndarray

    @property
    def out_size(self) -> int:
        return len(self.start)

    def matrix(self, o0: int, o1: int, i0: int, i1: int) -> np.ndarray:
        """The dense (o1 - o0, i1 - i0) float32 block mapping inputs [i0, i1) to outputs [o0, o1); they must cover them."""
        if o1 > o0 and (self.start[o0] < i0 or self.end[o1 - 1] > i1):
            raise ValueError(f"outputs [{o0}, {o1}) read inputs [{self.start[o0]}, {self.end[o1 - 1]}), not within [{i0}, {i1})")
        m = np.zeros((o1 - o0, i1 - i0), np.float64)
        for k in range(self.weights.shape[1]):
            idx = self.start[o0:o1] + k
            ok = idx < self.end[o0:o1]
            m[np.flatnonzero(ok), idx[ok] - i0] = self.weights[o0:o1][ok, k]
        return m.astype(np.float32)


def aa_bicubic_weights(in_size: int, out_size: int) -> AxisWeights:
    """The weights of one axis of ``F.interpolate(..., mode="bicubic", antialias=True, align_corners=False)``."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centre = scale * (np.arange(out_size) + 0.5)
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # C++ int64_t(): truncation toward zero
    hi = np.minimum((centre + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max())
    j = np.arange(taps)[None, :]
    w = _cubic((j + lo[:, None] - centre[:, None] + 0.5) * invscale)
    w = np.where(j < (hi - lo)[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total == 0, 1, total), 0.0)
    return AxisWeights(in_size, lo, hi, w)


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) after scaling the long side to ``long_side`` (0 or equal: unchanged), as `resize_long_side` rounds."""
    if long_side <= 0 or max(height, width) == long_side:
        return height, width
    s = long_side / max(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


class RowResampler:
    """Resize an image that arrives as bands of rows (top to bottom), emitting output bands as soon as they are complete.

    Each band is resized across its width first (``(rows, W, C)`` float32 -> ``(rows, W', C)``), so only the
    narrow rows wait for the vertical pass; memory is a window of ``~taps`` input rows plus one output band.
    """

    def __init__(self, height: int, width: int, out_height: int, out_width: int, band: int = 256) -> None:
        self.rows = aa_bicubic_weights(height, out_height)
        self.cols = aa_bicubic_weights(width, out_width)
        self.band = band
        # Across the width by taps, not as a dense (W, W') matrix: 31.6k x 20k columns would be 2.5 GB.
        taps = self.cols.weights.shape[1]
        self._col_index = torch.from_numpy(np.minimum(self.cols.start[:, None] + np.arange(taps), width - 1))  # (W', taps)
        self._col_weights = torch.from_numpy(self.cols.weights.astype(np.float32))  # zero past each column's end
        self._pending: list[np.ndarray] = []  # width-resized input rows [self._first, self._next)
        self._first = 0
        self._next = 0
        self._out = 0

    def push(self, block: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Feed the next input rows ``block`` (rows, W, C); returns the finished (first output row, (rows', W', C)) bands."""
        x = torch.from_numpy(np.ascontiguousarray(block, np.float32))  # (rows, W, C)
        narrow = torch.zeros(x.shape[0], self._col_index.shape[0], x.shape[2])
        for k in range(self._col_index.shape[1]):  # (rows, W', C) += w_k * x[:, start + k]
            narrow += x[:, self._col_index[:, k]] * self._col_weights[:, k, None]
        self._pending.append(narrow.numpy())
        self._next += block.shape[0]
        done: list[tuple[int, np.ndarray]] = []
        rows, out_h = self.rows, self.rows.out_size
        while self._out < out_h:
            # the outputs whose every input row has come, at most one band of them
            o1 = min(out_h, self._out + self.band, int(np.searchsorted(rows.end, self._next, side="right")))
            if o1 <= self._out:
                break
            window = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
            i0, i1 = int(rows.start[self._out]), int(rows.end[o1 - 1])
            m = torch.from_numpy(rows.matrix(self._out, o1, i0, i1))
            sub = torch.from_numpy(window[i0 - self._first : i1 - self._first])
            done.append((self._out, torch.einsum("oi,ivc->ovc", m, sub).clamp_(0, 1).numpy()))
            self._out = o1
            keep = int(rows.start[o1]) if o1 < out_h else self._next  # no later output reads rows above this
            self._pending = [window[keep - self._first :]]
            self._first = keep
        return done

    @property
    def finished(self) -> bool:
        return self._out >= self.rows.out_size


__all__ = ["AxisWeights", "RowResampler", "aa_bicubic_weights", "resized_size"]
