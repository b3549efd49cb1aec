"""Canvases on disk equal canvases in RAM: reads of any rows/columns (mirrored runs included) and writes of any block."""

from __future__ import annotations

import numpy as np
import pytest

from ultrastyle.core.canvas import Canvas

REGIONS = [
    (slice(None), slice(None)),
    (slice(2, 9), slice(1, 6)),
    (np.array([2, 1, 0, 1, 2, 3, 4]), np.array([1, 0, 1, 2, 3])),  # reflection at the top-left corner
    (np.array([0, 1, 2, 3, 2, 1]), slice(None)),  # whole rows with a mirrored run
    (np.array([33, 34, 35, 36, 35, 34]), np.array([49, 50, 51, 52, 51])),  # reflection at the bottom-right corner
    (slice(5, 5), slice(None)),  # empty
    (np.array([3, 2, 1]), np.array([4, 3, 2])),  # descending only
]


@pytest.mark.parametrize("positioned", [True, False], ids=["pread", "seek"])  # seek: Windows, which has no os.pread/pwrite
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(3, 37, 53), (7, 40, 53)])
def test_disk_canvas_equals_ram_canvas(tmp_path, shape, channels_last, monkeypatch, positioned):
    if not positioned:
        for name in ("preadv", "pread", "pwrite"):
            monkeypatch.delattr("ultrastyle.core.canvas.os." + name, raising=False)
    if channels_last:  # chunks of a few rows, so that runs span several chunks
        monkeypatch.setattr("ultrastyle.core.canvas._HWC_CHUNK_BYTES", 3 * shape[0] * 4 * shape[2])
    rng = np.random.default_rng(0)
    ram, disk = Canvas(*shape), Canvas(*shape, disk_dir=tmp_path, channels_last=channels_last)
    assert disk.on_disk and not ram.on_disk
    a = rng.random(shape, dtype=np.float32)
    partial = rng.random((shape[0], 7, 5), dtype=np.float32)
    full_rows = rng.random((shape[0], 4, shape[2]), dtype=np.float32)
    for canvas in (ram, disk):
        canvas.write(0, 0, a)
        canvas.write(3, 2, partial)
        canvas.write(10, 0, full_rows)
    for rows, cols in REGIONS:
        got = disk.read(rows, cols)
        assert got.shape == ram.read(rows, cols).shape
        np.testing.assert_array_equal(got, ram.read(rows, cols))
    np.testing.assert_array_equal(disk.numpy(), ram.numpy())
    assert disk.numpy()[0, 3, 2] == partial[0, 0, 0]
    ram.close()
    disk.close()


@pytest.mark.parametrize("channels_last", [False, True])
def test_disk_canvas_refuses_a_block_past_its_edge(tmp_path, channels_last):
    with Canvas(3, 10, 10, disk_dir=tmp_path, channels_last=channels_last) as disk:
        with pytest.raises(ValueError, match="does not fit"):
            disk.write(8, 0, np.zeros((3, 4, 10), np.float32))


def test_channels_last_file_holds_each_pixels_channels_together(tmp_path):
    """The layout itself: pixel (r, c)'s channels are adjacent in the file (what makes a tile row one read)."""
    block = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    with Canvas(2, 3, 4, disk_dir=tmp_path, channels_last=True) as disk:
        disk.write(0, 0, block)
        raw = np.fromfile(f"/proc/self/fd/{disk._fd()}", np.float32)
    np.testing.assert_array_equal(raw, block.transpose(1, 2, 0).ravel())


def _element_bytes(shape, rows, cols, hwc):
    """Every byte offset a read of canvas[:, rows, cols] touches in the file."""
    c, h, w = shape
    ch, r, k = np.meshgrid(np.arange(c), np.asarray(rows), np.asarray(cols), indexing="ij")
    elem = (r * w + k) * c + ch if hwc else (ch * h + r) * w + k
    return set((elem.ravel()[:, None] * 4 + np.arange(4)).ravel().tolist())


@pytest.mark.parametrize("hwc", [False, True])
def test_prefetch_ranges_are_the_bytes_a_read_takes(hwc):
    from ultrastyle.core.canvas import _coalesce, _file_ranges

    shape = (3, 20, 30)
    rows = np.array([2, 1, 0, 1, 2, 3, 4, 5, 6])  # a mirrored halo, then a run
    cols = np.arange(7, 19)
    pieces = _coalesce(_file_ranges(shape, rows, cols, hwc), gap=0)
    advised = set()
    for off, n in pieces:
        advised.update(range(off, off + n))
    assert advised == _element_bytes(shape, rows, cols, hwc)
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
    # Nearby pieces merge: one request for the region with the default gap.
    assert len(_coalesce(_file_ranges(shape, rows, cols, hwc))) == 1 < len(pieces)


@pytest.mark.parametrize("channels_last", [False, True])
def test_prefetch_advises_the_kernel_from_a_thread(tmp_path, channels_last, monkeypatch):
    import os
    import threading

    calls = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((fd, off, n, advice, threading.current_thread())))
    ram = Canvas(3, 20, 30)
    ram.prefetch(slice(0, 5), slice(None))
    canvas = Canvas(3, 20, 30, disk_dir=tmp_path, channels_last=channels_last)
    fd = canvas._fd()
    canvas.prefetch(slice(4, 9), slice(None))
    canvas._advice.result(timeout=10)  # close() would cancel advice that has not started
    canvas.close()
    assert calls and all(c[0] == fd and c[3] == os.POSIX_FADV_WILLNEED for c in calls)
    assert all(c[4] is not threading.main_thread() for c in calls)
    advised = {b for _, off, n, _, _ in calls for b in range(off, off + n)}
    assert _element_bytes((3, 20, 30), np.arange(4, 9), np.arange(30), channels_last) <= advised


def test_close_waits_for_advice_already_running(tmp_path, monkeypatch):
    import os
    import threading
    from concurrent.futures import Future

    import ultrastyle.core.canvas as canvas_module

    open_during: list[bool] = []  # per advice call: the canvas's file was still open under it
    started = threading.Event()
    close_progressed = threading.Event()  # close waits (on the advice) or has returned: set from the closing thread
    real_result = Future.result

    def result(self, timeout=None):
        if threading.current_thread().name == "closer" and not self.done():
            close_progressed.set()  # close is about to wait, the advice still running
        return real_result(self, timeout)

    def held(fd, off, n, advice):  # advice that is still running when close comes, until close waits or is done
        started.set()
        progressed = close_progressed.wait(10)
        try:
            open_during.append(progressed and os.fstat(fd).st_ino == inode)
        except OSError:  # the descriptor was closed under it
            open_during.append(False)

    monkeypatch.setattr(Future, "result", result)
    monkeypatch.setattr(os, "posix_fadvise", held)
    canvas = Canvas(3, 20, 30, disk_dir=tmp_path)
    inode = os.fstat(canvas._fd()).st_ino
    canvas.prefetch(slice(0, 10), slice(0, 5))
    assert started.wait(10)  # running when close comes
    canvas.prefetch(slice(10, 20), slice(0, 5))  # queued, then cancelled by close
    closer = threading.Thread(target=lambda: (canvas.close(), close_progressed.set()), name="closer")
    closer.start()
    closer.join(20)
    assert not closer.is_alive()
    n = len(open_during)
    canvas_module._advisor().submit(int).result(10)  # the advice thread runs in order: whatever was queued has run now
    assert n >= 1 and open_during == [True] * n  # the file open under every advice, and nothing ran on it after close
