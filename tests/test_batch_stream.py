"""The streaming batch executor: order, isolation, a bounded queue, kill -9 and Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ultrastyle.runtime.batch as batch
import ultrastyle.runtime.decode as reading
from ultrastyle.models.pretrained import load_model
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.batch import StylizeOptions, run_batch
from ultrastyle.runtime.pairs import StyleSpec, plan_pairs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small contents (one corrupt), a style."""
    d = tmp_path_factory.mktemp("stream_in")
    photos = sorted((shared_dir / "images/content").glob("*.jpg"))
    for i in range(6):
        with Image.open(photos[i % len(photos)]) as im:
            im.convert("RGB").resize((64 + 8 * i, 48), Image.Resampling.LANCZOS).save(d / f"c{i}.png")
    (d / "c3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with Image.open(shared_dir / "images/style/cd_style_in2.jpg") as im:
        im.convert("RGB").resize((64, 64)).save(d / "style.png")
    return d


@pytest.fixture(scope="module")
def runner(cd16x_dir: Path):
    with TorchRunner(load_model(cd16x_dir, stages=(5, 4))) as r:
        yield r


def _pairs(folder: Path, out: Path) -> list:
    return plan_pairs(sorted(folder.glob("c*.png")), [StyleSpec((folder / "style.png",))], out, "png")


def test_results_keep_pair_order_and_a_bad_file_fails_alone(folder, runner, tmp_path, monkeypatch):
    real = batch.decode
    c1_decoded = threading.Event()
    held, finished = [], []

    def c0_after_c1(src, options, *plan):  # c0 finishes decoding only after c1 has: the decodes end out of order
        if src.name == "c0.png":
            held.append(c1_decoded.wait(10))
        try:
            return real(src, options, *plan)
        finally:
            finished.append(src.name)
            if src.name == "c1.png":
                c1_decoded.set()

    monkeypatch.setattr(batch, "decode", c0_after_c1)
    pairs = _pairs(folder, tmp_path)
    seen = []
    summary = run_batch(runner, pairs, StylizeOptions(levels=(5, 4), style_size=64, io_workers=3), on_result=seen.append)
    assert held == [True] and finished.index("c1.png") < finished.index("c0.png"), (held, finished)
    assert [r.pair for r in summary.results] == pairs == [r.pair for r in seen]
    assert [r.status for r in summary.results] == ["done"] * 3 + ["failed"] + ["done"] * 2
    assert "c3.png" in summary.results[3].error
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.output.name for p in pairs if "c3" not in p.output.name)
    assert summary.wall_seconds > 0 and summary.seconds_per_megapixel > 0


def _decode_vs_compute(monkeypatch, c0_waits_for_c1: list[bool] | None = None) -> list[tuple[str, str]]:
    """Records ("decode", name) at each decode's start and ("done", name) at each content's end of compute.

    ``c0_waits_for_c1``: c0's compute ends only once c1's decode has started (or 10 s passed), the wait's outcome appended.
    """
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    c1_started = threading.Event()
    real_decode, real_content = batch.decode, batch.stylize_content

    def decode(src, options, *plan):
        with lock:
            events.append(("decode", src.name))
        if src.name == "c1.png":
            c1_started.set()
        return real_decode(src, options, *plan)

    def content(model, decoded, pairs, *a, **k):
        out = real_content(model, decoded, pairs, *a, **k)
        if c0_waits_for_c1 is None:
            time.sleep(0.2)  # room for a read-ahead to start, were it allowed
        elif pairs[0].content.name == "c0.png":
            c0_waits_for_c1.append(c1_started.wait(10))
        with lock:
            events.append(("done", pairs[0].content.name))
        return out

    monkeypatch.setattr(batch, "decode", decode)
    monkeypatch.setattr(batch, "stylize_content", content)
    return events


def test_contents_are_decoded_ahead_within_the_allowance(folder, runner, tmp_path, monkeypatch):
    waited: list[bool] = []
    events = _decode_vs_compute(monkeypatch, c0_waits_for_c1=waited)
    run_batch(runner, _pairs(folder, tmp_path / "a"), StylizeOptions(levels=(5,), style_size=64, io_workers=2))
    first_done = events.index(("done", "c0.png"))
    assert waited == [True], events  # c1's decode started while c0 was computed: read ahead
    assert ("decode", "c1.png") in events[:first_done]


def test_a_full_allowance_holds_the_next_decode_back(folder, runner, tmp_path, monkeypatch):
    events = _decode_vs_compute(monkeypatch)
    run_batch(runner, _pairs(folder, tmp_path / "b"), StylizeOptions(levels=(5,), style_size=64, io_workers=2, io_memory=1))
    decodes = [name for kind, name in events if kind == "decode" and name != "style.png"]  # styles are decoded as contents are
    for name in decodes[1:]:  # each decode waits for the previous content to be computed
        i = events.index(("decode", name))
        prev = decodes[decodes.index(name) - 1]
        assert ("done", prev) in events[:i] or prev == "c3.png", events


def _script(out: Path, folder: Path, model: Path, body: str) -> str:
    return textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        import ultrastyle.io.images as images
        {body}
        from ultrastyle.cli.main import app
        sys.argv = ["ultrastyle", "stylize", *sorted(str(p) for p in Path({str(folder)!r}).glob("c*.png")),
                    "--style", {str(folder / "style.png")!r}, "-o", {str(out)!r}, "--model", {str(model)!r},
                    "--backend", "torch", "--levels", "5,4", "--style-size", "64", "--io-workers", "2"]
        app()
    """)


def _wait_for(pred, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _interrupt(script: str, ready, again_after: float | None = None, signum: int = signal.SIGINT) -> tuple[int, str, str]:
    """Run ``script``, press Ctrl-C (``signum``) once ``ready()`` (and again ``again_after`` s later); (status, stdout, stderr)."""
    # A shell's background job starts with SIGINT ignored, which a child inherits (and Python then leaves
    # ignored): the child gets the default disposition, as a terminal's foreground command has.
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        _wait_for(ready)
        proc.send_signal(signum)
        if again_after is not None:
            time.sleep(again_after)
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


def _partials(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if "partial" in p.name]


def test_kill_9_mid_write_leaves_a_partial_that_the_rerun_removes(folder, cd16x_dir, tmp_path):
    out = tmp_path / "out"
    stall = textwrap.indent(textwrap.dedent("""
        real = images._encode
        def _encode(a, f, fmt, *args):
            if "c2" in f.name:
                f.write(b"half an image"); f.flush(); time.sleep(600)
            return real(a, f, fmt, *args)
        images._encode = _encode
    """), " " * 8)
    proc = subprocess.Popen([sys.executable, "-c", _script(out, folder, cd16x_dir, stall)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # c2's partial, the one that stalls: c0's and c1's exist for moments before their renames.
        _wait_for(lambda: out.is_dir() and any("c2" in p.name for p in _partials(out)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert _partials(out)  # what kill -9 leaves
    rerun = subprocess.run([sys.executable, "-c", _script(out, folder, cd16x_dir, "pass").replace(
        '"--io-workers", "2"]', '"--io-workers", "2", "--skip-existing"]')], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert rerun.returncode == 1, rerun.stderr  # c3 is corrupt
    assert _partials(out) == []
    assert sorted(p.name for p in out.iterdir()) == [f"c{i}_stylized_style.png" for i in (0, 1, 2, 4, 5)]
    with Image.open(out / "c2_stylized_style.png") as im:
        im.load()


def test_ctrl_c_prints_the_summary_exits_130_and_leaves_nothing_partial(folder, cd16x_dir, tmp_path):
    out = tmp_path / "out"
    slow = textwrap.indent(textwrap.dedent("""
        real = images._encode
        def _encode(a, f, fmt, *args):
            time.sleep(1.0)  # the batch is still running when Ctrl-C comes
            return real(a, f, fmt, *args)
        images._encode = _encode
    """), " " * 8)
    code, stdout, stderr = _interrupt(_script(out, folder, cd16x_dir, slow), lambda: out.is_dir() and any(p.suffix == ".png" for p in out.iterdir()))
    assert code == 130, (stdout, stderr)
    done = int(stdout.split(" done,")[0].split()[-1])
    assert 1 <= done < 5 and "of 6 pairs" in stdout and "outputs in" in stdout, stdout  # queued outputs were dropped
    said = (f"interrupted: the image being computed was dropped and the outputs already being written were finished (nothing partial "
            f"is left); rerun with --skip-existing to resume (the {done} written are kept)")
    assert said in " ".join(stderr.split()), stderr
    assert _partials(out) == []
    assert len([p for p in out.iterdir() if p.suffix == ".png"]) == done


def test_sigterm_is_taken_as_a_ctrl_c_and_exits_143_with_nothing_partial(folder, cd16x_dir, tmp_path):
    """What `kill`, systemd and schedulers send: the console script's entry (`cli.entry.main`) unwinds it as a Ctrl-C."""
    out = tmp_path / "out"
    slow = textwrap.indent(textwrap.dedent("""
        real = images._encode
        def _encode(a, f, fmt, *args):
            time.sleep(1.0)
            return real(a, f, fmt, *args)
        images._encode = _encode
    """), " " * 8)
    script = _script(out, folder, cd16x_dir, slow).replace("from ultrastyle.cli.main import app", "from ultrastyle.cli.entry import main as app")
    code, stdout, stderr = _interrupt(script, lambda: out.is_dir() and any(p.suffix == ".png" for p in out.iterdir()), signum=signal.SIGTERM)
    assert code == 143, (stdout, stderr)
    assert "rerun with --skip-existing" in " ".join(stderr.split()) and "Traceback" not in stderr, stderr
    assert _partials(out) == []
    for p in out.iterdir():
        with Image.open(p) as im:
            im.load()


def test_a_second_ctrl_c_while_outputs_finish_still_exits_130_with_whole_files(folder, cd16x_dir, tmp_path):
    out, started = tmp_path / "out", tmp_path / "second-encode-started"
    slow = textwrap.indent(textwrap.dedent(f"""
        real, calls = images._encode, []
        def _encode(a, f, fmt, *args):
            calls.append(1)
            if len(calls) == 2:  # the second output is being encoded when both Ctrl-Cs come
                Path({str(started)!r}).touch()
                time.sleep(4.0)
            return real(a, f, fmt, *args)
        images._encode = _encode
    """), " " * 8)
    # The second Ctrl-C a second later, while the first is waiting for the second output's encode.
    code, stdout, stderr = _interrupt(_script(out, folder, cd16x_dir, slow), started.exists, again_after=1.0)
    assert code == 130, (stdout, stderr)
    assert "interrupted before the summary" in stderr and "--skip-existing" in stderr, stderr
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert _partials(out) == []
    written = sorted(p for p in out.iterdir() if p.suffix == ".png")
    assert len(written) >= 2  # the encode in flight was finished, not torn
    for p in written:
        with Image.open(p) as im:
            im.load()


def test_io_workers_default_comes_from_the_core_count(monkeypatch):
    import ultrastyle.options

    # Half the cores this process may use (affinity, cgroup quota: `usable_cpus`, looked up there), between 1 and 8.
    for cores, workers in ((1, 1), (2, 1), (5, 2), (16, 8), (40, 8)):
        monkeypatch.setattr(ultrastyle.options, "usable_cpus", lambda cores=cores: cores)
        assert StylizeOptions().workers == workers, cores
    assert StylizeOptions(io_workers=3).workers == 3
    assert np.isclose(StylizeOptions(tiling=None).io_allowance, 2**30)


def test_an_output_its_format_cannot_hold_fails_before_any_tile(folder, runner, tmp_path, monkeypatch):
    import ultrastyle.io.pyramid as pyramid

    real, stylized = batch.stylize_canvas, []
    monkeypatch.setattr(batch, "stylize_canvas", lambda *a, **k: stylized.append(1) or real(*a, **k))
    out = tmp_path / "out"
    pairs = plan_pairs([folder / "c0.png", folder / "c1.png"], [StyleSpec((folder / "style.png",))], out, "jpg")
    monkeypatch.setattr(pyramid, "JPEG_MAX_SIDE", 70)  # c0 (64x48) fits, c1 (72x48) does not
    results = run_batch(runner, pairs, StylizeOptions(levels=(5, 4), format="jpg")).results
    assert [r.status for r in results] == ["done", "failed"]
    assert "c1" in results[1].error and "JPEG holds at most 70 pixels a side, this image is 72x48" in results[1].error
    assert len(stylized) == 1  # c1 failed before its tiles
    assert [p.name for p in out.iterdir()] == [pairs[0].output.name]


def test_the_summary_gives_a_rate_only_from_a_megapixel_done():
    from ultrastyle.runtime.pairs import BatchSummary, PairResult

    small = BatchSummary([PairResult(None, "done", None, 1.0, 0.05), PairResult(None, "failed", "x", 0.1)], wall_seconds=2.0)
    assert small.describe() == "1 done, 0 skipped, 1 failed of 2 pairs in 2.0 s (0.05 MP)"
    large = BatchSummary([PairResult(None, "done", None, 20.0, 8.0)] * 2, wall_seconds=42.0)
    assert large.describe(3) == "2 done, 0 skipped, 0 failed of 3 pairs in 42.0 s (16.0 MP, 2.62 s/MP)"


def test_a_style_too_large_to_read_whole_is_streamed_at_style_size(runner, shared_dir, tmp_path, monkeypatch):
    """A style is read as a content is: streamed and resized band by band where reading it whole would not fit, so a 60 MP
    style keeps the memory rule; its statistics match the whole read's."""
    pytest.importorskip("pyvips", reason="streaming reads need pyvips (pip install 'ultrastyle[vips]')")
    from ultrastyle.io import stream

    style = tmp_path / "big_style.png"
    with Image.open(shared_dir / "images/style/cd_style_in1.jpg") as im:
        im.convert("RGB").resize((900, 640)).save(style)
    opened: list[Path] = []
    real = stream.open_stream
    monkeypatch.setattr(reading, "open_stream", lambda src, **kw: opened.append(Path(src)) or real(src, **kw))
    whole = batch.StyleBook(runner, StylizeOptions(style_size=256, levels=(5, 4), streaming="never")).get(style)
    assert opened == []
    streamed = batch.StyleBook(runner, StylizeOptions(style_size=256, levels=(5, 4), streaming="auto", io_memory=1 << 20)).get(style)
    assert opened == [style]  # 900 x 640 read whole is above a 1 MiB allowance: streamed
    for k in (5, 4):
        a, b = whole[k], streamed[k]
        mean_a, mean_b = (a.sum / a.count).numpy(), (b.sum / b.count).numpy()
        assert a.count == b.count and np.abs(mean_a - mean_b).max() <= 1e-5 * np.abs(mean_a).max(), k  # the same filter, by bands


def test_the_jpeg_side_limit_is_the_one_the_encoders_keep():
    import io

    from PIL import Image

    from ultrastyle.io.images import ImageError
    from ultrastyle.io.pyramid import JPEG_MAX_SIDE, check_output_size

    Image.new("RGB", (JPEG_MAX_SIDE, 8)).save(io.BytesIO(), "JPEG")  # the widest allowed writes
    with pytest.raises(OSError):
        Image.new("RGB", (JPEG_MAX_SIDE + 1, 8)).save(io.BytesIO(), "JPEG")  # one more fails, but only at the write
    check_output_size("o.jpg", "jpg", 8, JPEG_MAX_SIDE)
    with pytest.raises(ImageError, match="JPEG holds at most 65500 pixels a side"):
        check_output_size("o.jpg", "jpg", 8, JPEG_MAX_SIDE + 1)  # refused before any tile runs


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_an_in_memory_content_is_resized_band_by_band_where_its_whole_resize_would_not_fit(shared_dir: Path, dtype: type) -> None:
    # The in-memory path resized the whole image in float32 (12 bytes a pixel and more) whatever the allowance:
    # +1 GB at 6000 x 6000 under a 400 MB budget. Now it streams as a file does, to the same pixels.
    from ultrastyle.io.sources import ImageInput
    from ultrastyle.io.stream import ArrayStream

    with Image.open(shared_dir / "images/content/cd_content_in1.jpg") as im:
        a8 = np.asarray(im.convert("RGB").resize((2100, 1500)))
    a = {np.uint8: a8, np.uint16: a8.astype(np.uint16) * 257, np.float32: a8.astype(np.float32) / 255}[dtype]
    src = ImageInput(a, "content")
    small = StylizeOptions(content_size=300, io_memory=1 << 20)
    plan = reading.read_plan(src, small)
    assert plan[0] and plan[1] < reading.read_plan(src, StylizeOptions(content_size=300, streaming="never"))[1]  # streamed: less
    streamed = reading.decode(src, small, plan)
    assert isinstance(streamed.stream, ArrayStream) and streamed.shape == (214, 300, 3)
    assert not reading.read_plan(ImageInput(a[:300, :400], "c"), small)[0]  # small: its bands would hold more than the whole
    whole = reading.decode(src, StylizeOptions(content_size=300, streaming="never"))
    from ultrastyle.core.canvas import CanvasSite

    with streamed.to_canvas(CanvasSite()) as c1, whole.to_canvas(CanvasSite()) as c2:
        d = np.abs(c1.read(slice(None), slice(None)) - c2.read(slice(None), slice(None)))
    assert d.max() <= 1e-5, d.max()  # the same filter, by bands
    assert not reading.read_plan(src, StylizeOptions(content_size=0, io_memory=1 << 20))[0]  # no resize: nothing to stream


def test_outputs_differing_only_in_case_collide_where_the_disk_ignores_case(tmp_path, monkeypatch):
    """macOS and Windows: Photo.jpg and photo.png wrote one file, the summary said 2 done (and --skip-existing skipped one)."""
    import ultrastyle.runtime.pairs as pairs_module
    from ultrastyle.io.paths import ignores_case
    from ultrastyle.runtime.pairs import OutputCollisionError

    for name in ("Photo.jpg", "photo.png", "style.png"):
        (tmp_path / name).write_bytes(b"x")
    contents, style = [tmp_path / "Photo.jpg", tmp_path / "photo.png"], [StyleSpec((tmp_path / "style.png",))]
    assert ignores_case(tmp_path) is False  # this machine's disk tells the names apart: both outputs are made
    assert len(plan_pairs(contents, style, tmp_path / "out", "png")) == 2
    monkeypatch.setattr(pairs_module, "ignores_case", lambda folder: True)
    with pytest.raises(OutputCollisionError, match=r"would both write .*photo_stylized_style\.png \(and Photo_stylized_style\.png: one file"):
        plan_pairs(contents, style, tmp_path / "out", "png")


def test_a_style_file_s_earlier_versions_leave_the_book_when_a_new_one_is_read(tmp_path):
    """A service rewriting one style path kept every version's statistics until the cap (leak review: 40 rewrites, 40
    entries); in-memory styles and other files stay."""
    from ultrastyle.runtime.batch import StyleBook, StylizeOptions

    book = StyleBook(None, StylizeOptions())  # type: ignore[arg-type]  # the cache alone: no model needed
    path, other = tmp_path / "s.png", tmp_path / "t.png"
    for version in range(5):
        assert book._remember(book._stats, (path, ("sig", version)), lambda v=version: {"v": v}) == {"v": version}
    book._remember(book._stats, (other, ("sig", 0)), lambda: {"v": "other"})
    book._remember(book._stats, ("memory", "digest"), lambda: {"v": "memory"})
    assert list(book._stats) == [(path, ("sig", 4)), (other, ("sig", 0)), ("memory", "digest")]


def test_the_style_book_is_bounded_in_bytes_and_a_stylizers_books_share_one_bound(tmp_path, shared_dir, cd16x_dir, monkeypatch):
    """A count alone let a model of wide features hold ~1.2 GB per book (256 styles of ~4.7 MB), in each of 8 books."""
    import ultrastyle
    from ultrastyle.runtime.batch import StyleBook, StylizeOptions

    book = StyleBook(None, StylizeOptions())  # type: ignore[arg-type]
    mb = np.zeros(1 << 20, np.uint8)
    for i in range(6):
        book._remember(book._stats, (tmp_path / f"s{i}.png", ("sig",)), lambda: {"a": mb.copy()}, keep=100, keep_bytes=3 << 20)
    assert [k[0].name for k in book._stats] == ["s3.png", "s4.png", "s5.png"]  # the least recently used went first
    huge = np.zeros(5 << 20, np.uint8)
    book._remember(book._stats, (tmp_path / "big.png", ("sig",)), lambda: (huge, []), keep=100, keep_bytes=3 << 20)
    assert [k[0].name for k in book._stats] == ["big.png"]  # over the bound alone: still kept, it is the one in use

    monkeypatch.setattr(StyleBook, "KEEP_BYTES", 1)  # one style's statistics at a time, over every settings
    styles = sorted((shared_dir / "images/style").glob("*.jpg"))[:2]
    with ultrastyle.load(cd16x_dir, levels=(5,)) as s:
        content = np.full((32, 32, 3), 128, np.uint8)
        s.stylize(content, styles[0], style_size=64)
        s.stylize(content, styles[1], style_size=64)
        s.stylize(content, styles[1], style_size=48)  # another book
        assert len(s._books) == 2 and len(s._stats) == 1
        assert next(iter(s._stats))[0] == styles[1]


def test_skip_existing_redoes_a_png_or_jpeg_cut_short(tmp_path):
    """A copy or sync interrupted leaves a short file under the output's name: it was kept as done."""
    from ultrastyle.runtime.batch import output_exists

    a = (np.arange(48 * 40 * 3) % 251).astype(np.uint8).reshape(48, 40, 3)
    for suffix in (".png", ".jpg", ".tif"):
        whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
        Image.fromarray(a).save(whole)
        cut.write_bytes(whole.read_bytes()[:-20])
        assert output_exists(whole), suffix
        assert output_exists(cut) is (suffix == ".tif"), suffix  # a TIFF's end says nothing: any non-empty one counts
    (tmp_path / "empty.png").write_bytes(b"")
    assert not output_exists(tmp_path / "empty.png") and not output_exists(tmp_path / "missing.png")
