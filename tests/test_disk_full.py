"""A disk that fills part-way: a batch stops computing what it could not write, saying so once; each writer names the
file and the cause (not the source it read, nor a bare errno), and leaves nothing partial."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ultrastyle
from ultrastyle.cli.main import app
from ultrastyle.io.atomic import disk_full
from ultrastyle.io.images import ImageError

FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def inputs(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four tiny contents in a folder and one tiny style."""
    d = tmp_path_factory.mktemp("full_in")
    (d / "in").mkdir()
    with Image.open(shared_dir / "images/content/cd_content_in2.jpg") as im:
        base = np.asarray(im.convert("RGB").resize((40, 32)))
    for i in range(4):
        Image.fromarray(np.roll(base, 5 * i, axis=0)).save(d / "in" / f"p{i}.png")
    with Image.open(shared_dir / "images/style/cd_style_in2.jpg") as im:
        im.convert("RGB").resize((48, 48)).save(d / "style.png")
    return d / "in", d / "style.png"


def _written_to_a_full_disk(*args, **kwargs):
    path = Path(args[1])
    try:
        raise FULL
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the image ({exc.strerror})") from exc


def test_the_cause_of_a_full_disk_is_found_behind_the_errors_that_wrap_it():
    try:
        try:
            raise FULL
        except OSError as exc:
            raise ImageError("x.png: cannot write the image") from exc
    except ImageError as wrapped:
        assert disk_full(wrapped) is FULL
    assert disk_full(OSError(errno.EFBIG, "File too large")) is None  # one file's limit: the next may fit
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    assert disk_full(ValueError("no")) is None


def test_a_full_disk_stops_a_stylize_batch_and_says_so_once(inputs, cd16x_dir, tmp_path, one_thread):
    import ultrastyle.runtime.batch as batch

    contents, style = inputs
    computed: list[str] = []
    real = batch.stylize_content

    def counting(model, decoded, pairs, *a, **k):
        computed.extend(p.content.name for p in pairs)
        return real(model, decoded, pairs, *a, **k)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(batch, "save_output", _written_to_a_full_disk)
        m.setattr(batch, "stylize_content", counting)
        r = CliRunner().invoke(app, ["stylize", str(contents), "--style", str(style), "-o", str(tmp_path / "out"), "--style-size", "48",
                                     "--model", str(cd16x_dir), "--levels", "5", "--io-workers", "1"])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert computed[0] == "p0.png" and len(computed) <= 2  # the next content may have started while the write failed
    not_made = [ln for ln in r.output.splitlines() if "not made" in ln]
    assert len(not_made) == 1, r.output  # one line for every pair not made
    assert f"not made: no room is left on the disk of {tmp_path / 'out'} (No space left on device, writing p0_stylized_style.png)" in not_made[0]
    assert "run the batch again with --skip-existing" in not_made[0]
    assert "0 done, 0 skipped, 4 failed of 4 pairs" in r.stdout
    with ultrastyle.load(cd16x_dir, levels=(5,)) as stylizer, pytest.MonkeyPatch.context() as m:
        m.setattr(batch, "save_output", _written_to_a_full_disk)
        summary = stylizer.stylize_batch(contents, style, tmp_path / "py", style_size=48, io_workers=1)
    assert [r.status for r in summary.results] == ["failed"] * 4
    assert "cannot write the image (No space left on device)" in summary.results[0].error
    assert summary.results[-1].error.startswith("not made: no room is left") and summary.results[-1].remedy is not None


def test_a_full_disk_stops_the_pairs_of_the_content_being_computed_too(inputs, cd16x_dir, tmp_path, one_thread):
    """One content, three styles: the first write fails, the other two styles are not computed (the stop was checked
    between contents only)."""
    import ultrastyle.runtime.batch as batch

    contents, style = inputs
    styles = []
    for k in range(3):
        styles.append(tmp_path / f"s{k}.png")
        Image.fromarray(np.roll(np.asarray(Image.open(style)), 9 * k, axis=1)).save(styles[-1])
    computed: list[str] = []
    real = batch.stylize_canvas
    with pytest.MonkeyPatch.context() as m:
        m.setattr(batch, "save_output", _written_to_a_full_disk)
        m.setattr(batch, "stylize_canvas", lambda *a, **k: computed.append("pair") or real(*a, **k))
        with ultrastyle.load(cd16x_dir, levels=(5,)) as stylizer:
            summary = stylizer.stylize_batch(contents / "p0.png", styles, tmp_path / "out", style_size=48, io_workers=1)
    assert [r.status for r in summary.results] == ["failed"] * 3
    assert "cannot write the image" in summary.results[0].error
    assert all(r.error.startswith("not made: no room is left") for r in summary.results[1:])
    assert len(computed) <= 2  # the second may have started while the first was being written


def test_libvips_writing_to_a_full_disk_is_seen_as_a_full_disk(tmp_path, monkeypatch):
    pyvips = pytest.importorskip("pyvips", reason="JPEG bands are written by libvips: the vips extra is not installed here")
    from ultrastyle.io.pyramid import write_jpeg_bands

    def full(self, *a, **k):
        raise pyvips.Error("unable to call jpegsave", "VipsTarget: write error\nwrite: system error: No space left on device")

    monkeypatch.setattr(pyvips.Image, "jpegsave", full)
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ImageError, match="cannot write the image \\(No space left on device\\)") as info:
        write_jpeg_bands([a], tmp_path / "o.jpg", 16, 16)
    assert disk_full(info.value) is not None and disk_full(info.value).errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no temp file left


def test_a_full_disk_stops_an_optimize_batch_and_a_state_that_cannot_be_saved_is_a_warning(inputs, cd16x_dir, tmp_path, one_thread):
    import ultrastyle.io.pyramid as pyramid
    import ultrastyle.optimization.run as run
    from ultrastyle.optimization.batch import optimize_batch

    contents, style = inputs
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pyramid, "save_output", _written_to_a_full_disk)
        runs = []
        real = run.Optimizer.run
        m.setattr(run.Optimizer, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
        summary = optimize_batch(contents, style, tmp_path / "out", model=cd16x_dir, iterations=0, style_size=48, progress=False)
    assert len(runs) == 1  # the other three were not computed
    assert [r.status for r in summary.results] == ["failed"] * 4
    assert all(r.error.startswith(f"not made: no room is left on the disk of {tmp_path / 'out'}") for r in summary.results[1:])

    def no_room(*a, **k):
        raise FULL

    with pytest.MonkeyPatch.context() as m:  # the solver's state needs far more room than the image: the image goes on
        m.setattr(run, "_save_state", no_room)
        with pytest.warns(run.StateWarning, match="cannot save the optimization state \\(No space left on device\\)") as said:
            summary = optimize_batch(contents / "p0.png", style, tmp_path / "saved", model=cd16x_dir, iterations=3, style_size=48,
                                     save_every=1, progress=False)  # fmt: skip
    assert [r.status for r in summary.results] == ["done"] and len([w for w in said if w.category is run.StateWarning]) == 1
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["p0_optimized_style.png"]


def test_installing_into_a_full_cache_blames_the_cache_not_the_source(cd16x_dir, monkeypatch):
    from ultrastyle.models import zoo

    real = zoo.atomic_write

    @contextlib.contextmanager
    def full_after_a_while(path, *a, **k):
        with real(path, *a, **k):  # the temp file made and removed as a real one
            class Full:
                def write(self, data):
                    raise FULL

            yield Full()

    monkeypatch.setattr(zoo, "atomic_write", full_after_a_while)
    with pytest.raises(zoo.ZooError) as info:
        zoo.import_local("cd-wct-16x", cd16x_dir)
    said = str(info.value)
    assert "cannot write" in said and str(zoo.home_dir()) in said and "No space left on device" in said and "cannot read" not in said
    assert not any("partial" in p.name for p in zoo.home_dir().rglob("*"))


def test_a_checkpoint_that_cannot_be_saved_names_its_path(tmp_path, monkeypatch):
    from ultrastyle.distill import trainer

    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError) as info:
        trainer.atomic_save({"x": 1}, tmp_path / "run" / "last.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "run" / "last.pt")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temp file left


def test_libvips_errors_give_the_system_error_they_carry():
    from ultrastyle.io.pyramid import _vips_cause

    vips = Exception("unable to call jpegsave\n  VipsTarget: write error\nwrite: system error: No space left on device\n")
    assert _vips_cause(vips) == "No space left on device"
    assert _vips_cause(Exception("unable to call jpegsave\n  jpegsave: bad quality")) == "libvips: unable to call jpegsave"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EROFS])
def test_an_export_that_cannot_be_written_is_one_bundle_error(code, tmp_path, monkeypatch):
    from ultrastyle.export import bundle

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(bundle, "_export", fail)
    with pytest.raises(bundle.BundleError, match=f"cannot write the bundle \\({os.strerror(code)}\\)"):
        bundle.export_bundle(object(), tmp_path / "b")  # type: ignore[arg-type]


def test_a_ray_worker_stops_its_contents_pairs_at_a_full_disk_and_tells_the_driver(inputs, cd16x_dir, tmp_path, monkeypatch, one_thread):
    """The actor's own method, in this process: the first write fails, the other styles are not computed, and the output
    whose write found the disk full comes back (as a plain OSError, to cross to the driver) so the pool stops too."""
    import ultrastyle.distributed.worker as worker_module
    import ultrastyle.runtime.batch as batch
    from ultrastyle.distributed.worker import RunnerSpec, StylizeWorker
    from ultrastyle.runtime.pairs import StyleSpec, plan_pairs

    contents, style = inputs
    styles = []
    for k in range(3):
        styles.append(tmp_path / f"s{k}.png")
        Image.fromarray(np.roll(np.asarray(Image.open(style)), 9 * k, axis=1)).save(styles[-1])
    worker = StylizeWorker(RunnerSpec(str(cd16x_dir), backend="torch", threads=1, stages=(5,)), {})
    assert worker.runner is not None, worker.error
    options = batch.StylizeOptions(levels=(5,), style_size=48, io_workers=1)
    table = {s: worker.style_statistics(s, options) for s in styles}
    pairs = plan_pairs([contents / "p0.png"], [StyleSpec((s,)) for s in styles], tmp_path / "out", "png")
    computed: list[str] = []
    real = batch.stylize_canvas
    monkeypatch.setattr(worker_module, "save_output", _written_to_a_full_disk)
    monkeypatch.setattr(batch, "stylize_canvas", lambda *a, **k: computed.append("pair") or real(*a, **k))
    try:
        results, full = worker.stylize_pairs(contents / "p0.png", pairs, options, table)
    finally:
        worker.runner.deactivate()  # its thread count back now, not when collected in a later test
    assert [r.status for r in results] == ["failed"] * 3 and len(computed) == 1  # written in turn: nothing more computed
    assert "cannot write the image (No space left on device)" in results[0].error
    assert all(r.error.startswith("not made: no room is left") for r in results[1:])
    assert full is not None and full[0] == pairs[0].output and type(full[1]) is OSError and full[1].errno == errno.ENOSPC
