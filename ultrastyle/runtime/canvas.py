"""Canvases: (C, H, W) float32 arrays that tiles are read from and written into.

Small canvases live in RAM. Large ones live in an unlinked scratch file and
are reached through a numpy memmap opened per access: the mapping is dropped
after every tile, so the pages a tile touched do not stay in the process's
resident set and image size is limited by disk, not RAM.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class Canvas:
    """A float32 (C, H, W) array, in RAM or on disk."""

    def __init__(self, channels: int, height: int, width: int, *, disk_dir: str | Path | None = None) -> None:
        self.shape = (channels, height, width)
        self._ram: np.ndarray | None = None
        self._file = None
        if disk_dir is None:
            self._ram = np.zeros(self.shape, np.float32)
        else:
            # Unlinked at once: the space comes back even if the process is killed.
            fd, name = tempfile.mkstemp(prefix="ultrastyle-canvas-", suffix=".f32", dir=disk_dir)
            os.unlink(name)
            self._file = os.fdopen(fd, "w+b")
            try:
                # Reserve the blocks now: a sparse file that meets a full disk
                # later would kill the process with SIGBUS mid-image.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self.nbytes)
                else:  # pragma: no cover - macOS/Windows
                    self._file.truncate(self.nbytes)
            except OSError as exc:
                self._file.close()
                raise OSError(f"cannot allocate a {self.nbytes / 2**30:.1f} GiB scratch canvas in {disk_dir}: {exc}") from exc

    @property
    def nbytes(self) -> int:
        c, h, w = self.shape
        return c * h * w * 4

    def _array(self) -> np.ndarray:
        if self._ram is not None:
            return self._ram
        if self._file is None:
            raise ValueError("canvas is closed")
        return np.memmap(self._file, dtype=np.float32, mode="r+", shape=self.shape)

    def read(self, rows: np.ndarray | slice, cols: np.ndarray | slice) -> np.ndarray:
        """A copy of ``canvas[:, rows, cols]``; index arrays may repeat rows (reflection)."""
        a = self._array()
        rows, cols = _as_index(rows), _as_index(cols)
        # Copy only the bounding box (a memmap pages in just that), then gather within it.
        r_box, r_idx = _box(rows)
        c_box, c_idx = _box(cols)
        out = np.array(a[:, r_box, c_box])
        del a
        if r_idx is not None:
            out = out[:, r_idx]
        if c_idx is not None:
            out = out[:, :, c_idx]
        return np.ascontiguousarray(out)

    def write(self, row: int, col: int, block: np.ndarray) -> None:
        """``canvas[:, row:row+h, col:col+w] = block`` for block (C, h, w)."""
        a = self._array()
        a[:, row : row + block.shape[1], col : col + block.shape[2]] = block
        del a  # unmapping leaves the pages to the page cache; no msync: nothing needs them on disk

    def rows_band(self, r0: int, r1: int) -> np.ndarray:
        """A copy of rows [r0, r1) of every channel: (C, r1 - r0, W)."""
        return self.read(slice(r0, r1), slice(None))

    def numpy(self) -> np.ndarray:
        """The whole canvas as an in-RAM array (a copy when on disk)."""
        return self._ram if self._ram is not None else self.read(slice(None), slice(None))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._ram = None

    def __enter__(self) -> Canvas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_index(idx: np.ndarray | slice) -> np.ndarray | slice:
    if isinstance(idx, slice):
        return idx
    idx = np.asarray(idx)
    if idx.size and np.all(np.diff(idx) == 1):  # contiguous: a slice avoids a gather copy
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _box(idx: np.ndarray | slice) -> tuple[slice, np.ndarray | None]:
    """(bounding slice, indices relative to it or None when the slice is the answer)."""
    if isinstance(idx, slice):
        return idx, None
    lo = int(idx.min())
    return slice(lo, int(idx.max()) + 1), idx - lo


def canvas_from_array(
    a: np.ndarray, *, layout: str = "hwc", disk_dir: str | Path | None = None, band: int = 512
) -> Canvas:
    """A canvas holding ``a`` ((H, W, C) or, with ``layout="chw"``, (C, H, W)); uint8/uint16 scale to [0, 1].

    Converted ``band`` rows at a time so a 100 MP image never has a whole
    float32 copy in RAM besides the canvas.
    """
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    chw = layout == "chw"
    c, h, w = a.shape if chw else (a.shape[2], a.shape[0], a.shape[1])
    peak = sample_peak(a.dtype)
    canvas = Canvas(c, h, w, disk_dir=disk_dir)
    try:
        for r in range(0, h, band):
            blk = a[:, r : r + band] if chw else np.moveaxis(a[r : r + band], 2, 0)
            canvas.write(r, 0, blk.astype(np.float32) / np.float32(peak))
    except BaseException:
        canvas.close()
        raise
    return canvas


def sample_peak(dtype: np.dtype) -> int:
    """The value that means 1.0: 255 for uint8, 65535 for uint16, 1 for floats."""
    return {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(np.dtype(dtype), 1)
