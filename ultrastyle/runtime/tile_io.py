"""Tile reads and writes of host canvases overlapped with compute: one read ahead, writes behind.

A tiled pass whose canvases live in RAM or on disk gathers every tile's
region from the host (mirrored indices, strided copies, disk reads) and
scatters its core back. Done in line, a GPU waits for each. `TileIO` does
that host work on two worker threads (numpy, torch copies and pread/pwrite
release the GIL):

- `TileIO.fetch`: the reader thread gathers the next tile's region, into
  page-locked memory for a GPU, while the current one computes; taking it
  queues its copy to the device on the compute stream.
- `TileIO.store`: on a GPU the core is copied to page-locked memory on a
  download stream that waits for the compute stream; the writer thread waits
  for that copy (a blocking-sync event: it sleeps) and scatters it into the
  canvas. At most `WRITES_BEHIND` stores are outstanding.
- Leaving the context waits for every store (raising the first failure) and
  for a read still running: no thread outlives its pass.

A stored block must not be written to afterwards: runners return fresh
tensors (CUDA-graph modes of `torch.compile` do not: `RunnerTraits.stable_outputs`).
Off, or for a canvas on the device, each call is the synchronous
`Canvas.read_tensor` / `Canvas.write_tensor`. On the CPU the same threads run
without page-locked memory or streams: the tests hold that to the synchronous
pass bit for bit. Which runners use it: `RunnerTraits.overlap_io`; docs/gpu.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas

# Stores outstanding before `TileIO.store` waits for the oldest: two lets one scatter run while the next core copies.
WRITES_BEHIND = 2

Index = np.ndarray | slice
T = TypeVar("T")
# A tile region on its way: calling it returns the region as (1, C, h, w) on the device (once).
Pending = Callable[[], torch.Tensor]


class TileIO:
    """Reads and writes tiles of canvases for a runner on ``device``; ``overlap``: on worker threads (module docstring).

    Use as a context manager around one pass: leaving it waits for every
    store (and raises the first failure, unless already raising) and for a
    read still running.
    """

    def __init__(self, device: torch.device, overlap: bool) -> None:
        self.device, self.overlap = device, overlap
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="ultrastyle-tile-read") if overlap else None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ultrastyle-tile-write") if overlap else None
        self._writes: deque[Future[None]] = deque()
        self._download = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def _threaded(self, canvas: Canvas) -> bool:
        return self.overlap and isinstance(canvas, Canvas) and canvas.device is None

    def fetch(self, canvas: Canvas, rows: Index, cols: Index, *, ahead: bool = True) -> Pending:
        """Start reading ``canvas[:, rows, cols]`` (index arrays may repeat: mirroring).

        ``ahead``: it is wanted after other work, so a disk canvas read in line
        is asked to start reading it now (`Canvas.prefetch`); False: wanted next.
        """
        if not self._threaded(canvas):
            if ahead:
                canvas.prefetch(rows, cols)  # advice only: a disk canvas starts reading, others ignore it
            return lambda: canvas.read_tensor(rows, cols, self.device)[None]
        assert self._reader is not None
        staged = self._reader.submit(canvas.read_host, rows, cols, pinned=self._download is not None)
        # page-locked for a GPU: the copy is queued on the compute stream; the caching host allocator keeps the block until it is done
        return lambda: staged.result().to(self.device, non_blocking=True)[None]

    def read_ahead(self, items: Sequence[T], fetch: Callable[[T, bool], Pending]) -> Iterator[tuple[T, torch.Tensor]]:
        """Each of ``items`` with its region on the device; the next one's read starts before this one is handed out.

        ``fetch(item, ahead)`` starts one read (`fetch`, usually).
        """
        pending = fetch(items[0], False) if items else None
        for k, item in enumerate(items):
            assert pending is not None
            x = pending()
            if k + 1 < len(items):
                pending = fetch(items[k + 1], True)
            yield item, x

    def store(self, canvas: Canvas, row: int, col: int, block: torch.Tensor) -> None:
        """``canvas[:, row:row+h, col:col+w] = block`` for a float32 (C, h, w); threaded: done behind, `flush` waits."""
        if not self._threaded(canvas):
            canvas.write_tensor(row, col, block)
            return
        assert self._writer is not None
        while len(self._writes) >= WRITES_BEHIND:  # before this block is staged: at most WRITES_BEHIND held at once
            self._writes.popleft().result()
        if self._download is not None and block.device.type == "cuda":
            # Queued here, on the compute thread: record_stream covers only work already on the stream.
            staged = torch.empty(block.shape, dtype=torch.float32, pin_memory=True)
            self._download.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._download):
                staged.copy_(block, non_blocking=True)
                done = torch.cuda.Event(blocking=True)  # the writer sleeps on it rather than spin a core
                done.record()
            block.record_stream(self._download)
            job = self._writer.submit(_write_when, done, canvas, row, col, staged)
        else:
            job = self._writer.submit(canvas.write, row, col, block.detach().cpu().numpy())
        self._writes.append(job)

    def flush(self) -> None:
        """Wait for every store; raise the first that failed."""
        while self._writes:
            self._writes.popleft().result()

    def close(self, raising: bool = False) -> None:
        """Wait for what runs (stores, a read), then stop the threads; ``raising``: swallow store failures (one is being raised)."""
        try:
            if raising:
                for job in self._writes:
                    job.exception()  # waits; the failure that is being raised matters more
                self._writes.clear()
            else:
                self.flush()
        finally:
            for pool in (self._reader, self._writer):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)  # a read not started is dropped, one running awaited

    def __enter__(self) -> TileIO:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(raising=kind is not None)


def _write_when(done: torch.cuda.Event, canvas: Canvas, row: int, col: int, staged: torch.Tensor) -> None:
    done.synchronize()  # the device-to-host copy has landed in ``staged``
    canvas.write(row, col, staged.numpy())
