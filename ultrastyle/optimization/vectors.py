"""Image-sized vectors kept in canvases (RAM or an unlinked disk file), and the band-wise arithmetic optimizers need.

An optimizer's state at a gigapixel is several image-sized float32 vectors
(L-BFGS: the image, its gradient, a direction and 2 x history; Adam: the
image and two moments). They live in `core.canvas.Canvas` objects, RAM or
disk as the budget says (a `core.canvas.CanvasSite`); every operation here reads and writes
them ``band`` rows at a time, in float64 where it reduces, so RAM holds a few
bands whatever the image size. Saved state is ``.npy`` files written band by
band too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ultrastyle.core.canvas import Canvas

BAND_BYTES = 4 << 20  # per vector and band


def _bands(canvas: Canvas) -> Iterator[tuple[int, int]]:
    c, h, w = canvas.shape
    step = max(1, BAND_BYTES // (c * w * 4))
    for r in range(0, h, step):
        yield r, min(h, r + step)


def _rows(canvas: Canvas, r0: int, r1: int) -> np.ndarray:
    return canvas.read(slice(r0, r1), slice(None))


def dot(a: Canvas, b: Canvas) -> float:
    """Σ a·b in float64."""
    total = 0.0
    for r0, r1 in _bands(a):
        total += float(np.dot(_rows(a, r0, r1).ravel().astype(np.float64), _rows(b, r0, r1).ravel().astype(np.float64)))
    return total


def max_abs(a: Canvas) -> float:
    return max(float(np.abs(_rows(a, r0, r1)).max(initial=0.0)) for r0, r1 in _bands(a))


def combine(dst: Canvas, terms: list[tuple[float, Canvas]]) -> None:
    """``dst = Σ coef · vector`` (``dst`` may be one of the vectors), in float64 per band."""
    for r0, r1 in _bands(dst):
        acc = None
        for coef, v in terms:
            part = coef * _rows(v, r0, r1).astype(np.float64)
            acc = part if acc is None else acc + part
        assert acc is not None
        dst.write(r0, 0, acc.astype(np.float32))


def apply(dst: Canvas, srcs: list[Canvas], fn: Callable[..., np.ndarray]) -> None:
    """``dst = fn(*bands of srcs)`` band by band (``fn`` sees and returns float32 (C, rows, W) arrays)."""
    for r0, r1 in _bands(dst):
        dst.write(r0, 0, np.asarray(fn(*(_rows(s, r0, r1) for s in srcs)), np.float32))


def save(canvas: Canvas, path: Path) -> None:
    """Write ``canvas`` as an ``.npy`` file (float32 (C, H, W)), band by band.

    Written, not memory-mapped: mapped pages count in the resident set until unmapped (a whole state file).
    """
    c, h, w = canvas.shape
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": canvas.shape})
        start = f.tell()
        for r0, r1 in _bands(canvas):
            rows = _rows(canvas, r0, r1)  # (C, rows, W): each channel's rows have their own place in the file
            for ch in range(c):
                f.seek(start + (ch * h + r0) * w * 4)
                f.write(np.ascontiguousarray(rows[ch], "<f4").tobytes())


def load(path: Path, canvas: Canvas) -> None:
    """Fill ``canvas`` from an ``.npy`` file `save` wrote; ValueError when the shapes differ or the file is short."""
    c, h, w = canvas.shape
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if tuple(shape) != canvas.shape or dtype != np.dtype("<f4") or fortran:
            raise ValueError(f"{path}: holds {dtype} {tuple(shape)}, expected float32 {canvas.shape}")
        start = f.tell()
        for r0, r1 in _bands(canvas):
            block = np.empty((c, r1 - r0, w), np.float32)
            for ch in range(c):
                f.seek(start + (ch * h + r0) * w * 4)
                data = f.read((r1 - r0) * w * 4)
                if len(data) != block[ch].nbytes:
                    raise ValueError(f"{path}: ends early (a truncated state file)")
                block[ch] = np.frombuffer(data, "<f4").reshape(r1 - r0, w)
            canvas.write(r0, 0, block)
