"""Canvases: (C, H, W) float32 arrays that tiles are read from and written into.

Where a canvas lives (`CanvasSite`):

- in RAM (a numpy array), the default;
- on disk: an unlinked scratch file read and written with positioned I/O
  (pread/pwrite, a call per channel row), so image size is limited by disk,
  not RAM. Feature caches (many channels) are stored channels-last on disk
  (``channels_last``): a tile's row is then one read of every channel, where
  (C, H, W) made it C reads of a few KB, each a separate disk request once
  the cache has left the page cache. Not a memory map: mapped pages count in the process's resident
  set, and the kernel maps 64 KB around every touched page, so a tile read
  through a map held whole canvas rows (~1000 rows x width x 12 bytes):
  440 MiB of file pages at once in a 100 MP run, more as images widen;
- on a GPU (a torch tensor), where the image's canvases fit beside the tiles
  in the device budget: tiles then never cross to the host. Measured on an
  H100 (benchmarks/gpu_torch.py), host canvases cost the tiled path most of
  its time: strided copies, page faults and device-host transfers.

Tiles move through `Canvas.read_tensor` / `Canvas.write_tensor`; from and to a
host canvas they cross a GPU through page-locked memory. `Canvas.prefetch`
asks the kernel to start reading the next tile's region of a disk canvas
while the current tile computes (`posix_fadvise` WILLNEED, from a background
thread: the advice itself allocates page-cache pages, which under memory
pressure means reclaiming others).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class CanvasSite:
    """Where new canvases go: ``device`` (a torch device), else ``disk_dir``, else RAM."""

    disk_dir: str | None = None
    device: torch.device | None = None


class Canvas:
    """A float32 (C, H, W) array, in RAM, on disk or on a torch device."""

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        *,
        disk_dir: str | Path | None = None,
        device: torch.device | None = None,
        channels_last: bool = False,
    ) -> None:
        self.shape = (channels, height, width)
        self._hwc = channels_last and disk_dir is not None and device is None  # a file layout only
        self._ram: np.ndarray | None = None
        self._tensor: torch.Tensor | None = None
        self._file = None
        self._advice: Future[None] | None = None
        if device is not None:
            self._tensor = torch.zeros(self.shape, dtype=torch.float32, device=device)
        elif disk_dir is None:
            self._ram = np.zeros(self.shape, np.float32)
        else:
            # Nameless from the start (POSIX: unlinked at once; Windows: deleted on close, as an open file cannot be
            # removed there): the space comes back even if the process is killed.
            self._file = tempfile.TemporaryFile("w+b", prefix="ultrastyle-canvas-", suffix=".f32", dir=disk_dir)
            fd = self._file.fileno()
            try:
                # Reserve the blocks now: a sparse file that meets a full disk
                # later would kill the process with SIGBUS mid-image.
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, self.nbytes)
                else:  # pragma: no cover - macOS/Windows
                    self._file.truncate(self.nbytes)
            except OSError as exc:
                self._file.close()
                size = f"{self.nbytes / 2**30:.1f} GiB" if self.nbytes >= 2**30 else f"{math.ceil(self.nbytes / 2**20)} MiB"
                raise OSError(f"cannot allocate a {size} scratch canvas in {disk_dir}: {exc}") from exc

    @classmethod
    def at(cls, site: CanvasSite, channels: int, height: int, width: int, *, channels_last: bool = False) -> Canvas:
        """A canvas at ``site``; ``channels_last``: on disk, stored (H, W, C) (reads and writes still take (C, h, w))."""
        return cls(channels, height, width, disk_dir=site.disk_dir, device=site.device, channels_last=channels_last)

    @property
    def nbytes(self) -> int:
        c, h, w = self.shape
        return c * h * w * 4

    @property
    def on_disk(self) -> bool:
        """Whether the canvas is a scratch file (read a region at a time; its pages are not kept in RAM)."""
        return self._file is not None

    @property
    def device(self) -> torch.device | None:
        """The torch device holding the canvas; None for RAM and disk canvases."""
        return None if self._tensor is None else self._tensor.device

    def _array(self) -> np.ndarray:
        if self._ram is not None:
            return self._ram
        raise ValueError("canvas is closed")

    def _fd(self) -> int:
        if self._file is None:
            raise ValueError("canvas is closed")
        return self._file.fileno()

    def read(self, rows: np.ndarray | slice, cols: np.ndarray | slice) -> np.ndarray:
        """A copy of ``canvas[:, rows, cols]``; index arrays may repeat rows (reflection)."""
        if self._tensor is not None:
            return self.read_tensor(rows, cols, torch.device("cpu")).numpy()
        return self._read_host(rows, cols)

    def _read_host(self, rows: np.ndarray | slice, cols: np.ndarray | slice, out: torch.Tensor | None = None) -> np.ndarray:
        if out is None:
            # numpy's allocator, not torch's: with huge pages PyTorch aligns large blocks to 2 MB, and
            # 100 MP tiled PyTorch peaked at 1.95 GiB that way, 1.84-1.89 GiB this way (run Y).
            out = torch.from_numpy(np.empty(self._region_shape(rows, cols), np.float32))
        if self._file is not None:
            (_file_gather_hwc if self._hwc else _file_gather)(self._fd(), self.shape, rows, cols, out.numpy())
        else:
            _gather(torch.from_numpy(self._array()), rows, cols, out)
        return out.numpy()

    def _region_shape(self, rows: np.ndarray | slice, cols: np.ndarray | slice) -> tuple[int, int, int]:
        return self.shape[0], _length(rows, self.shape[1]), _length(cols, self.shape[2])

    def read_tensor(self, rows: np.ndarray | slice, cols: np.ndarray | slice, device: torch.device) -> torch.Tensor:
        """``canvas[:, rows, cols]`` as a contiguous float32 tensor on ``device`` (a copy)."""
        if self._tensor is not None:
            out = self._tensor.new_empty(self._region_shape(rows, cols))
            _gather(self._tensor, rows, cols, out)
            return out.to(device)
        if device.type != "cuda":
            return self.read_host(rows, cols)
        # To a GPU through page-locked memory: one host copy instead of two, and a DMA transfer.
        return self.read_host(rows, cols, pinned=True).to(device, non_blocking=True)  # PyTorch keeps the block until the copy is done

    def read_host(self, rows: np.ndarray | slice, cols: np.ndarray | slice, *, pinned: bool = False) -> torch.Tensor:
        """``canvas[:, rows, cols]`` as a new float32 CPU tensor (C, h, w); ``pinned``: page-locked, for an asynchronous copy to a GPU."""
        if self._tensor is not None:
            return self.read_tensor(rows, cols, torch.device("cpu"))
        if not pinned:
            return torch.from_numpy(self._read_host(rows, cols))
        staged = torch.empty(self._region_shape(rows, cols), dtype=torch.float32, pin_memory=True)
        self._read_host(rows, cols, out=staged)
        return staged

    def write(self, row: int, col: int, block: np.ndarray) -> None:
        """``canvas[:, row:row+h, col:col+w] = block`` for block (C, h, w)."""
        if self._tensor is not None:
            self.write_tensor(row, col, torch.from_numpy(np.ascontiguousarray(block)))
            return
        if self._file is not None:
            scatter = _file_scatter_hwc if self._hwc else _file_scatter
            scatter(self._fd(), self.shape, row, col, np.ascontiguousarray(block, np.float32))
            return
        a = self._array()
        torch.from_numpy(a[:, row : row + block.shape[1], col : col + block.shape[2]]).copy_(_as_tensor(block))

    def write_tensor(self, row: int, col: int, block: torch.Tensor) -> None:
        """``canvas[:, row:row+h, col:col+w] = block`` for a float tensor (C, h, w) on any device."""
        if self._tensor is not None:
            self._tensor[:, row : row + block.shape[1], col : col + block.shape[2]] = block.to(self._tensor.device)
            return
        if block.device.type == "cuda":
            staged = torch.empty(block.shape, dtype=torch.float32, pin_memory=True)
            staged.copy_(block)  # a DMA transfer into page-locked memory, then one host copy
            block = staged
        self.write(row, col, block.detach().float().numpy())

    def prefetch(self, rows: np.ndarray | slice, cols: np.ndarray | slice) -> None:
        """Start reading ``canvas[:, rows, cols]`` from the disk for a `read` soon after; returns at once.

        Only advice: disk canvases queue it (one region at a time per canvas:
        a region still queued is replaced), other canvases ignore it.
        """
        if self._file is None or not hasattr(os, "posix_fadvise"):
            return
        ranges = _coalesce(_file_ranges(self.shape, rows, cols, self._hwc))
        if self._advice is not None and self._advice.cancel():
            self._advice = None
        self._advice = _advisor().submit(_advise, self._fd(), ranges)

    def rows_band(self, r0: int, r1: int) -> np.ndarray:
        """A copy of rows [r0, r1) of every channel: (C, r1 - r0, W)."""
        return self.read(slice(r0, r1), slice(None))

    def numpy(self) -> np.ndarray:
        """The whole canvas as an in-RAM array (a copy when on disk or on a device)."""
        return self._ram if self._ram is not None else self.read(slice(None), slice(None))

    def close(self) -> None:
        if self._advice is not None:  # the descriptor must not close (and be reused) under advice still running
            self._advice.cancel()
            _advisor().submit(int).result()  # one thread, first in first out: a barrier behind what runs now
            self._advice = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._ram = None
        self._tensor = None

    def __enter__(self) -> Canvas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(src: torch.Tensor, rows: np.ndarray | slice, cols: np.ndarray | slice, out: torch.Tensor) -> None:
    """``out[:] = src[:, rows, cols]`` by slice copies: one per run of consecutive (or mirrored) indices.

    A tile's rows are one run, plus a short reversed run where it reaches past
    the edge (reflection); slice copies use every core, where index_select
    made 40 MP tiled runs on a GPU host spend a third of their time gathering.
    """
    for ro, rs, rn, rflip in _runs(rows, src.shape[1]):
        for co, cs, cn, cflip in _runs(cols, src.shape[2]):
            block = src[:, rs : rs + rn, cs : cs + cn]
            flips = [d for d, f in ((1, rflip), (2, cflip)) if f]
            out[:, ro : ro + rn, co : co + cn].copy_(block.flip(flips) if flips else block)


def _file_gather(fd: int, shape: tuple[int, int, int], rows: np.ndarray | slice, cols: np.ndarray | slice, out: np.ndarray) -> None:
    """``out[:] = file[:, rows, cols]`` for a (C, H, W) float32 file, by positioned reads straight into ``out``.

    One read per channel where a run spans whole rows, else one per channel
    row; mirrored runs (reflection halos, a few rows) go through a small copy.
    """
    c, h, w = shape
    row_bytes = w * 4
    for (ro, rs, rn, rflip), (co, cs, cn, cflip) in _region_runs(rows, cols, h, w):
        for ch in range(c):
            dst = out[ch, ro : ro + rn, co : co + cn]  # each of its rows is contiguous
            flipped = rflip or cflip
            buf = np.empty((rn, cn), np.float32) if flipped else dst
            _read_rows(fd, buf, (ch * h + rs) * row_bytes + cs * 4, row_bytes)
            if flipped:
                dst[...] = buf[:: -1 if rflip else 1, :: -1 if cflip else 1]
            elif buf is not dst:
                dst[...] = buf


def _region_runs(
    rows: np.ndarray | slice, cols: np.ndarray | slice, h: int, w: int
) -> Iterator[tuple[tuple[int, int, int, bool], tuple[int, int, int, bool]]]:
    """The non-empty (row run, column run) pairs of a region (`_runs`)."""
    for r in _runs(rows, h):
        for c in _runs(cols, w):
            if r[2] and c[2]:
                yield r, c


def _read_rows(fd: int, buf: np.ndarray, offset: int, stride: int) -> None:
    """``buf[i]`` (each row contiguous) from ``offset + i * stride``: one call where the rows are adjacent in the file."""
    if len(buf) and buf.flags.c_contiguous and buf[0].nbytes == stride:
        _read_exact(fd, buf, offset)
    else:
        for i in range(len(buf)):
            _read_exact(fd, buf[i], offset + i * stride)


def _write_rows(fd: int, block: np.ndarray, offset: int, stride: int) -> None:
    """``block[i]`` (a contiguous array) to ``offset + i * stride``, as `_read_rows`."""
    if len(block) and block[0].nbytes == stride:
        _write_all(fd, block, offset)
    else:
        for i in range(len(block)):
            _write_all(fd, block[i], offset + i * stride)


def _check_block(shape: tuple[int, int, int], row: int, col: int, block: np.ndarray) -> None:
    c, h, w = shape
    bc, bh, bw = block.shape
    if bc != c or row < 0 or col < 0 or row + bh > h or col + bw > w:
        raise ValueError(f"block {block.shape} at ({row}, {col}) does not fit a canvas {shape}")


# Windows has no positioned reads or writes (os.pread, os.pwrite): a seek and a read or write, one file at a time.
_SEEK_LOCK = threading.Lock()


def read_at(fd: int, view: memoryview, offset: int) -> int:
    """Read into the byte ``view`` from ``offset`` of ``fd`` without moving a position other threads use; bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    if hasattr(os, "pread"):  # macOS before preadv
        data = os.pread(fd, view.nbytes, offset)
    else:
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, view.nbytes)
    view[: len(data)] = data
    return len(data)


def write_at(fd: int, view: memoryview | bytes, offset: int) -> int:
    """Write ``view`` at ``offset`` of ``fd`` (as `read_at` reads); bytes written."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, view, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, view)


def _read_exact(fd: int, buf: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``buf`` from ``offset``; a short read is an error (the file is preallocated)."""
    view = memoryview(buf).cast("B")
    while view.nbytes:
        n = read_at(fd, view, offset)
        if n <= 0:
            raise OSError(f"scratch canvas: read {n} bytes at offset {offset}, expected {view.nbytes}")
        view, offset = view[n:], offset + n


def _file_scatter(fd: int, shape: tuple[int, int, int], row: int, col: int, block: np.ndarray) -> None:
    """``file[:, row:row+h, col:col+w] = block`` for a contiguous float32 block (C, h, w), by positioned writes."""
    _check_block(shape, row, col, block)
    c, h, w = shape
    for ch in range(c):
        _write_rows(fd, block[ch], ((ch * h + row) * w + col) * 4, w * 4)


# Rows of a channels-last file moved per call: a few MB, so the transposing copy stays small beside a tile.
_HWC_CHUNK_BYTES = 4 * 2**20


def _file_gather_hwc(fd: int, shape: tuple[int, int, int], rows: np.ndarray | slice, cols: np.ndarray | slice, out: np.ndarray) -> None:
    """As `_file_gather` for an (H, W, C) file: one read per row of a run (every channel), transposed into ``out`` (C, r, c)."""
    c, h, w = shape
    pixel = c * 4
    for (ro, rs, rn, rflip), (co, cs, cn, cflip) in _region_runs(rows, cols, h, w):
        step = max(1, _HWC_CHUNK_BYTES // (cn * pixel))
        for j0 in range(0, rn, step):
            j1 = min(rn, j0 + step)
            buf = np.empty((j1 - j0, cn, c), np.float32)
            _read_rows(fd, buf, ((rs + j0) * w + cs) * pixel, w * pixel)
            t = buf.transpose(2, 0, 1)
            if cflip:
                t = t[:, :, ::-1]
            if rflip:  # source rows rs+j0.. land at the run's far end, reversed
                out[:, ro + rn - j1 : ro + rn - j0, co : co + cn] = t[:, ::-1]
            else:
                out[:, ro + j0 : ro + j1, co : co + cn] = t


def _file_scatter_hwc(fd: int, shape: tuple[int, int, int], row: int, col: int, block: np.ndarray) -> None:
    """As `_file_scatter` for an (H, W, C) file: the block transposed a few rows at a time, one write per row."""
    _check_block(shape, row, col, block)
    c, h, w = shape
    bh, bw = block.shape[1:]
    pixel = c * 4
    step = max(1, _HWC_CHUNK_BYTES // max(1, bw * pixel))
    for i0 in range(0, bh, step):
        t = np.ascontiguousarray(block[:, i0 : i0 + step].transpose(1, 2, 0))
        _write_rows(fd, t, ((row + i0) * w + col) * pixel, w * pixel)


def _write_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while view.nbytes:
        n = write_at(fd, view, offset)
        view, offset = view[n:], offset + n


def _file_ranges(shape: tuple[int, int, int], rows: np.ndarray | slice, cols: np.ndarray | slice, hwc: bool) -> np.ndarray:
    """(n, 2) [offset, length] in bytes, ascending, of the file pieces holding a region: a row of a run each."""
    c, h, w = shape
    parts = []
    for (_, rs, rn, _), (_, cs, cn, _) in _region_runs(rows, cols, h, w):
        r = np.arange(rs, rs + rn, dtype=np.int64)
        if hwc:
            starts, length = (r * w + cs) * c * 4, cn * c * 4
        else:
            starts, length = ((np.arange(c, dtype=np.int64)[:, None] * h + r) * w + cs).ravel() * 4, cn * 4
        parts.append(np.stack([starts, np.full_like(starts, length)], 1))
    if not parts:
        return np.zeros((0, 2), np.int64)
    out = np.concatenate(parts)
    return out[np.argsort(out[:, 0], kind="stable")]


# Pieces closer than this are advised as one: reading the gap costs less than another disk request.
_ADVICE_GAP = 128 * 1024


def _coalesce(ranges: np.ndarray, gap: int = _ADVICE_GAP) -> list[tuple[int, int]]:
    """Ascending (n, 2) [offset, length] pieces merged where they overlap or lie within ``gap`` bytes of each other."""
    if not len(ranges):
        return []
    ends = np.maximum.accumulate(ranges[:, 0] + ranges[:, 1])
    first = np.ones(len(ranges), bool)
    first[1:] = ranges[1:, 0] - ends[:-1] > gap
    heads = np.flatnonzero(first)
    starts, stops = ranges[heads, 0], ends[np.r_[heads[1:] - 1, len(ranges) - 1]]
    return list(zip(starts.tolist(), (stops - starts).tolist()))


def _advise(fd: int, ranges: list[tuple[int, int]]) -> None:
    try:
        for off, n in ranges:
            os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
    except OSError:  # advice only: the read that follows fails properly if the file does
        pass


_ADVISOR: tuple[int, ThreadPoolExecutor] | None = None
_ADVISOR_LOCK = threading.Lock()


def _advisor() -> ThreadPoolExecutor:
    """The process's prefetch thread, started on first use (and again in a forked child, which has no threads)."""
    global _ADVISOR
    with _ADVISOR_LOCK:
        if _ADVISOR is None or _ADVISOR[0] != os.getpid():
            _ADVISOR = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="ultrastyle-prefetch"))
        return _ADVISOR[1]


def _runs(idx: np.ndarray | slice, size: int) -> list[tuple[int, int, int, bool]]:
    """``idx`` as runs (start in the output, lowest source index, length, descending)."""
    if isinstance(idx, slice):
        start, stop, step = idx.indices(size)
        if step != 1:
            raise ValueError(f"canvas slices take step 1, got {step}")
        return [(0, start, max(0, stop - start), False)]
    idx = np.asarray(idx)
    gaps = np.diff(idx)
    runs, i, n = [], 0, len(idx)
    while i < n:
        step = int(gaps[i]) if i + 1 < n and gaps[i] in (1, -1) else 0
        if step:  # the run goes on while the gaps keep this step (a numpy search, not a Python loop)
            ends = np.flatnonzero(gaps[i:] != step)
            j = i + 1 + (int(ends[0]) if ends.size else n - 1 - i)
        else:
            j = i + 1
        runs.append((i, int(idx[j - 1]) if step == -1 else int(idx[i]), j - i, step == -1))
        i = j
    return runs


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``a``'s memory (a copy only where a stride is negative, which torch cannot view)."""
    a = np.asarray(a)
    return torch.from_numpy(a if all(st >= 0 for st in a.strides) else np.ascontiguousarray(a))


def _length(idx: np.ndarray | slice, size: int) -> int:
    return len(range(*idx.indices(size))) if isinstance(idx, slice) else len(idx)


def canvas_from_array(
    a: np.ndarray, *, layout: str = "hwc", disk_dir: str | Path | None = None, device: torch.device | None = None, band: int = 512
) -> Canvas:
    """A canvas holding ``a`` ((H, W, C) or, with ``layout="chw"``, (C, H, W)); uint8/uint16 scale to [0, 1].

    Converted ``band`` rows at a time so a 100 MP image never has a whole
    float32 copy in RAM besides the canvas. To a device canvas the samples
    travel in their own type (uint8: a quarter of float32's bytes) and are
    scaled there.
    """
    if layout not in ("hwc", "chw"):
        raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
    chw = layout == "chw"
    c, h, w = a.shape if chw else (a.shape[2], a.shape[0], a.shape[1])
    peak = sample_peak(a.dtype)
    canvas = Canvas(c, h, w, disk_dir=disk_dir, device=device)
    lut = None
    if device is not None and a.dtype == np.uint8:
        # uint8 samples travel as such and are looked up on the device in a table of the host's
        # float32 quotients (a GPU's division can round differently).
        lut = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(peak)).to(device)
    try:
        for r in range(0, h, band):
            blk = a[:, r : r + band] if chw else np.moveaxis(a[r : r + band], 2, 0)
            if lut is not None:
                canvas.write_tensor(r, 0, lut[torch.from_numpy(np.ascontiguousarray(blk)).to(device).long()])
            else:
                canvas.write(r, 0, blk.astype(np.float32) / np.float32(peak))
    except BaseException:
        canvas.close()
        raise
    return canvas


def sample_peak(dtype: np.dtype) -> int:
    """The value that means 1.0: 255 for uint8, 65535 for uint16, 1 for floats."""
    return {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(np.dtype(dtype), 1)
