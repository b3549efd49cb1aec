"""A `Canvas` over a zarr array in a folder every worker sees: the stages of one image shared across a cluster.

Arrays are (C, H, W) float32, uncompressed (feature maps and float images
hardly compress, and the bytes cross only the shared folder), chunked as one
tile core each: concurrent writers of different tiles never touch one chunk
file, so no locks are needed. Reads take the bounding box of the requested
rows and columns (a region, plus its mirrored rows at the image's edge) and
pick from it, which gives the same float32 values a RAM canvas would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas
from ultrastyle.distributed.cluster import ClusterError
from ultrastyle.errors import Setting, remedied


def zarr_lacking(version: str | None) -> str | None:
    """What is wrong with the zarr of ``version`` (None: not installed) for the stage arrays, or None: zarr 3 or newer."""
    if version is None:
        return "zarr is not installed"
    return None if int(version.split(".")[0]) >= 3 else f"zarr {version} is installed"


def require_zarr() -> None:
    """Raise `ClusterError` naming the fix when zarr 3 (the stage arrays of one image spread over a cluster) is missing."""
    try:
        import zarr
    except ImportError as exc:
        found: str | None = f"zarr is not installed ({exc})"
    else:
        found = zarr_lacking(zarr.__version__)
    if found is None:
        return
    raise remedied(ClusterError(f"spreading an image's tiles over a cluster (distribute_tiles) keeps its stages in zarr 3 arrays, "
                                f"but {found}; install the extra: pip install 'ultrastyle[ray]' (zarr 3 needs Python 3.11 or "
                                "newer), or run without it"), Setting("distribute_tiles"))  # fmt: skip


def create_array(path: str | Path, shape: tuple[int, int, int], chunk: tuple[int, int]) -> ZarrCanvas:
    """A new zeroed (C, H, W) float32 array at ``path``, one chunk per ``chunk`` = (rows, cols) core."""
    import zarr

    c, h, w = shape
    rows, cols = max(1, min(chunk[0], h)), max(1, min(chunk[1], w))
    z = zarr.create_array(
        store=str(path), shape=shape, chunks=(c, rows, cols), dtype="float32", compressors=None, fill_value=0.0,
        overwrite=True, zarr_format=3,
    )  # fmt: skip
    return ZarrCanvas(z)


def open_array(path: str | Path) -> ZarrCanvas:
    """An existing array (written by `create_array`, maybe on another machine)."""
    import zarr

    return ZarrCanvas(zarr.open_array(str(path), mode="r+"))


class ZarrCanvas(Canvas):
    """A float32 (C, H, W) canvas in a zarr array; the `Canvas` interface the tiled pipeline reads and writes."""

    def __init__(self, array: object) -> None:  # noqa: D107 - Canvas's RAM/disk/device set-up does not apply
        self._z = array
        self.shape = tuple(int(s) for s in array.shape)  # type: ignore[attr-defined]
        self._ram = self._tensor = self._file = None

    @property
    def path(self) -> str:
        return str(self._z.store.root)  # type: ignore[attr-defined]

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self._z.chunks)  # type: ignore[attr-defined]

    @property
    def on_disk(self) -> bool:
        return True

    @property
    def device(self) -> torch.device | None:
        return None

    def read(self, rows: np.ndarray | slice, cols: np.ndarray | slice) -> np.ndarray:
        rs, rpick = _box(rows, self.shape[1])
        cs, cpick = _box(cols, self.shape[2])
        block = np.asarray(self._z[:, rs, cs])  # type: ignore[index]
        if rpick is not None:
            block = block[:, rpick]
        if cpick is not None:
            block = block[:, :, cpick]
        return np.ascontiguousarray(block, dtype=np.float32)

    def read_tensor(self, rows: np.ndarray | slice, cols: np.ndarray | slice, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.read(rows, cols)).to(device)

    def read_host(self, rows: np.ndarray | slice, cols: np.ndarray | slice, *, pinned: bool = False) -> torch.Tensor:
        t = torch.from_numpy(self.read(rows, cols))
        return t.pin_memory() if pinned else t

    def write(self, row: int, col: int, block: np.ndarray) -> None:
        _, h, w = block.shape
        self._z[:, row : row + h, col : col + w] = np.asarray(block, dtype=np.float32)  # type: ignore[index]

    def write_tensor(self, row: int, col: int, block: torch.Tensor) -> None:
        self.write(row, col, block.detach().float().cpu().numpy())

    def numpy(self) -> np.ndarray:
        return self.read(slice(None), slice(None))

    def close(self) -> None:
        pass  # nothing is held open; the folder outlives this handle


def _box(idx: np.ndarray | slice, size: int) -> tuple[slice, np.ndarray | None]:
    """The bounding slice of ``idx`` and the picks into it (None: the slice is the selection)."""
    if isinstance(idx, slice):
        start, stop, step = idx.indices(size)
        if step != 1:
            raise ValueError(f"canvas slices take step 1, got {step}")
        return slice(start, stop), None
    idx = np.asarray(idx)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    if hi - lo == len(idx) and np.array_equal(idx, np.arange(lo, hi)):
        return slice(lo, hi), None
    return slice(lo, hi), idx - lo
