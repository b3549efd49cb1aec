"""runtime/tile_io.py: tile reads ahead and writes behind on worker threads give the synchronous pass's result,
bit for bit; a failed write surfaces and leaves no thread behind; writes behind are bounded; who turns it on."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array
from ultrastyle.core.plan import TilingOptions, plan_image
from ultrastyle.core.styles import Regions, Target
from ultrastyle.core.traits import EAGER_DEVICE, EAGER_HOST
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.cascade import style_statistics
from ultrastyle.runtime.tile_io import WRITES_BEHIND, TileIO
from ultrastyle.runtime.tiled import stylize_stage_tiled, stylize_tiled

LEVELS = (4, 1)  # stage 4 caches its features between the passes, stage 1 encodes again in pass 2


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir, stages=LEVELS)


def _io_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ultrastyle-tile-")]


@pytest.fixture
def workers(monkeypatch) -> list[str]:
    """The names of the threads that run canvas reads (`read_host`) and writes (`write`), in order."""
    seen: list[str] = []
    write, read_host = Canvas.write, Canvas.read_host

    def logged_write(self, *a):
        seen.append(threading.current_thread().name)
        return write(self, *a)

    def logged_read(self, *a, **k):
        seen.append(threading.current_thread().name)
        return read_host(self, *a, **k)

    monkeypatch.setattr(Canvas, "write", logged_write)
    monkeypatch.setattr(Canvas, "read_host", logged_read)
    return seen


def _on_workers(seen: list[str]) -> set[str]:
    return {n for n in seen if n.startswith("ultrastyle-tile-")}


def _run(model, content: np.ndarray, style, overlap: bool, site: CanvasSite, **kw) -> np.ndarray:
    opts = TilingOptions(tile=48, overlap_io=overlap, **kw)
    plan = plan_image(model.arch, *content.shape[1:], LEVELS, opts, EAGER_HOST, masked=isinstance(style, Regions))
    plan = replace(plan, site=site)  # RAM or disk canvases whatever the size
    assert plan.options.overlap_io is overlap and len(plan.stage(1).encode_tiles()) > 4
    with canvas_from_array(content, layout="chw", disk_dir=site.disk_dir) as cv:
        out = stylize_tiled(model, cv, style, opts, method="wct", alpha=0.6, levels=LEVELS, plan=plan)
        try:
            return out.numpy().copy()
        finally:
            out.close()


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_overlapped_passes_equal_the_synchronous_ones_bit_for_bit(cd16x, photo, style, tmp_path, where, one_thread, workers):
    content = photo[:, 5:133, 3:163].contiguous().numpy()  # 128 x 160, off the grid
    site = CanvasSite(disk_dir=str(tmp_path)) if where == "disk" else CanvasSite()
    stats = style_statistics(cd16x, style, LEVELS)
    sync = _run(cd16x, content, stats, False, site)
    assert workers and not _on_workers(workers)
    workers.clear()
    threaded = _run(cd16x, content, stats, True, site)
    assert _on_workers(workers) == {"ultrastyle-tile-read_0", "ultrastyle-tile-write_0"}
    assert np.array_equal(sync, threaded)
    assert not _io_threads()  # every pass's threads stopped with it
    if where == "disk":
        assert not list(tmp_path.iterdir())  # scratch files are unlinked at once either way


def test_overlapped_masked_regions_equal_the_synchronous_ones(cd16x, photo, style, one_thread, workers):
    content = photo[:, :96, :128].contiguous().numpy()
    labels = np.zeros((96, 128), np.int64)
    labels[:, 64:] = 1
    regions = Regions(labels, (Target((style_statistics(cd16x, style, LEVELS),)), Target((style_statistics(cd16x, style.flip(-1), LEVELS),))))
    sync = _run(cd16x, content, regions, False, CanvasSite())
    workers.clear()
    threaded = _run(cd16x, content, regions, True, CanvasSite())
    assert _on_workers(workers) == {"ultrastyle-tile-read_0", "ultrastyle-tile-write_0"}
    assert np.array_equal(sync, threaded)


class _FailingCanvas(Canvas):
    """A RAM canvas whose ``fail_at``-th write raises, as a full disk would."""

    def __init__(self, *args, fail_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.writes, self.threads = fail_at, 0, []

    def write(self, row, col, block):
        self.writes += 1
        self.threads.append(threading.current_thread().name)
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device (test)")
        super().write(row, col, block)


def test_a_failed_write_behind_is_raised_and_no_thread_is_left(cd16x, photo, style, one_thread):
    content = photo[:, :96, :128].contiguous().numpy()
    plan = plan_image(cd16x.arch, 96, 128, (1,), TilingOptions(tile=32), EAGER_HOST).stage(1)
    assert len(plan.decode_tiles()) > 4
    src = canvas_from_array(content, layout="chw")
    out = _FailingCanvas(3, 96, 128, fail_at=3)
    with pytest.raises(OSError, match="No space left"):
        stylize_stage_tiled(cd16x, src, style_statistics(cd16x, style, (1,)), plan, method="wct", alpha=0.6, out=out, overlap=True)
    assert not _io_threads()
    assert set(out.threads) == {"ultrastyle-tile-write_0"}  # the failure came from a write behind
    # the pass stopped within the writes allowed behind the failure, not at the end of the image
    assert out.writes <= 3 + WRITES_BEHIND + 1 < len(plan.decode_tiles())


class _SlowCanvas(Canvas):
    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def write(self, row, col, block):
        self.gate.wait(10)
        super().write(row, col, block)


def test_stores_wait_once_writes_behind_are_full_and_flush_waits_for_all(monkeypatch):
    from concurrent.futures import Future

    gate = threading.Event()
    canvas = _SlowCanvas(1, 4, 8, gate=gate)
    stored = []
    waits: list[tuple[int, bool]] = []  # (stores returned, whether the write waited on was done) as the producer waits
    progressed = threading.Event()  # the producer waits on a write, or has stored everything

    real_result = Future.result

    def result(self, timeout=None):
        if threading.current_thread().name == "producer":
            waits.append((len(stored), self.done()))
            progressed.set()
        return real_result(self, timeout)

    monkeypatch.setattr(Future, "result", result)

    def producer(io: TileIO) -> None:
        try:
            for j in range(WRITES_BEHIND + 2):
                io.store(canvas, 0, j, torch.full((1, 4, 1), float(j + 1)))
                stored.append(j)
        finally:
            progressed.set()

    with TileIO(torch.device("cpu"), overlap=True) as io:
        t = threading.Thread(target=producer, args=(io,), name="producer")
        t.start()
        try:
            assert progressed.wait(10)
            # WRITES_BEHIND stores outstanding (the writer held on the first): the next store waits for that write.
            assert waits[:1] == [(WRITES_BEHIND, False)] and stored == list(range(WRITES_BEHIND)), (waits, stored)
        finally:
            gate.set()
            t.join(10)
        assert not t.is_alive()
        io.flush()
    assert stored == list(range(WRITES_BEHIND + 2))
    assert canvas.numpy()[0, 0, : WRITES_BEHIND + 2].tolist() == [float(j + 1) for j in range(WRITES_BEHIND + 2)]


def test_fetch_reads_the_mirrored_region_as_read_tensor_does(tmp_path, workers):
    img = np.random.default_rng(0).random((3, 20, 30), dtype=np.float32)
    rows, cols = np.array([2, 1, 0, 1, 2, 3]), slice(25, 30)
    with canvas_from_array(img, layout="chw", disk_dir=str(tmp_path)) as cv:
        want = cv.read_tensor(rows, cols, torch.device("cpu"))
        workers.clear()
        with TileIO(torch.device("cpu"), overlap=True) as io:
            ahead = io.fetch(cv, rows, cols)
            got = ahead()
    assert workers == ["ultrastyle-tile-read_0"]  # read on the reader thread
    assert got.shape == (1, 3, 6, 5) and torch.equal(got[0], want)
    assert torch.equal(want, torch.from_numpy(img[:, [2, 1, 0, 1, 2, 3], 25:30]))


def test_device_canvases_are_read_and_written_in_line():
    io = TileIO(torch.device("cpu"), overlap=True)
    assert io._threaded(canvas_from_array(np.zeros((3, 4, 4), np.float32), layout="chw"))
    on_device = Canvas(3, 4, 4, device=torch.device("cpu"))  # a tensor canvas: nothing to move, no thread
    assert not io._threaded(on_device)
    io.store(on_device, 0, 0, torch.ones(3, 2, 2))
    assert not io._writes and on_device.numpy()[:, :2, :2].sum() == 12
    io.close()


def test_overlap_is_the_runners_choice_unless_the_options_say(cd16x):
    assert EAGER_HOST.overlap_io is False and EAGER_DEVICE.overlap_io is True
    assert TilingOptions().resolve(EAGER_HOST).overlap_io is False
    assert TilingOptions().resolve(EAGER_DEVICE).overlap_io is True
    assert TilingOptions(overlap_io=True).resolve(EAGER_HOST).overlap_io is True
    assert TilingOptions(overlap_io=False).resolve(EAGER_DEVICE).overlap_io is False
    with TorchRunner(cd16x) as r:  # on the CPU the threads would share the compute's cores
        assert r.traits.overlap_io is False


@pytest.mark.parametrize(("mode", "overlap"), [(None, True), ("max-autotune-no-cudagraphs", True), ("reduce-overhead", False)])
def test_a_compiled_cuda_runner_writes_behind_unless_it_replays_cuda_graphs(cd16x, monkeypatch, mode, overlap):
    # Traits only (nothing runs): on CUDA the overlap is on, except where outputs are CUDA-graph buffers.
    r = TorchRunner(cd16x, compile=True, compile_mode=mode)
    monkeypatch.setattr(TorchRunner, "device", property(lambda self: torch.device("cuda")))
    assert r.traits.uniform_tiles and r.traits.budget_memory == "device"
    assert r.traits.overlap_io is overlap and r.traits.stable_outputs is overlap
    if not overlap:  # asked for explicitly, the overlap is refused rather than racing the graph's buffers
        with pytest.raises(ValueError, match="reuses its output buffers"):
            TilingOptions(overlap_io=True).resolve(r.traits)
        assert TilingOptions().resolve(r.traits).overlap_io is False
