"""ultrastyle.io.atomic: atomic writes leave the old file or the new one, never a temp; sweep_stale."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ultrastyle.io import atomic
from ultrastyle.io.atomic import PARTIAL_SUFFIX, atomic_dir, atomic_path, atomic_write, partial_path, sweep_stale, write_atomic, writer_pid

REPO = Path(__file__).resolve().parents[1]


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- names


def test_partial_name_is_hidden_carries_pid_and_is_recognised(tmp_path: Path) -> None:
    p = partial_path(tmp_path / "out.png")
    assert p.parent == tmp_path
    assert p.name.startswith(".out.png.") and p.name.endswith(PARTIAL_SUFFIX)
    assert writer_pid(p) == os.getpid()
    assert partial_path(tmp_path / "out.png") != p  # a fresh token each time
    for other in (".out.png.partial", "out.png.tmp", ".out.png.partial-ab12cd", f"out.png.{os.getpid()}.0123abcd{PARTIAL_SUFFIX}",
                  f".out.png.{os.getpid()}.0123ABCD{PARTIAL_SUFFIX}", f".out.png.0.0123abcd{PARTIAL_SUFFIX}",
                  f".out.png.{os.getpid()}.0123abcd{PARTIAL_SUFFIX}.bak"):  # fmt: skip
        assert writer_pid(other) is None, other


def test_partial_name_of_a_very_long_name_fits_the_file_system(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 250)
    write_atomic(target, b"x")
    assert target.read_bytes() == b"x" and _names(tmp_path) == [target.name]


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_success_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    with atomic_write(target) as f:
        f.write(b"new")
        assert not target.exists()  # nothing at the target until the block ends
    assert target.read_bytes() == b"new" and _names(tmp_path) == ["a.bin"]
    with atomic_write(target, "w") as f:
        f.write("text é")
    assert target.read_text(encoding="utf-8") == "text é" and _names(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_write_body_raising_keeps_the_old_file_and_no_temp(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_write(target) as f:
            f.write(b"half of the new")
            f.flush()
            assert writer_pid(Path(f.name)) == os.getpid()  # the temp existed while writing
            raise exc
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["a.bin"]


def test_atomic_write_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_atomic_write_rejects_other_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "a", "ab"):
            pass


# ---------------------------------------------------------------- atomic_path / atomic_dir


def test_atomic_path_commits_what_the_library_wrote(tmp_path: Path) -> None:
    target = tmp_path / "g.onnx"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and writer_pid(tmp) == os.getpid()
        tmp.write_bytes(b"graph")
    assert target.read_bytes() == b"graph" and _names(tmp_path) == ["g.onnx"]


def test_atomic_path_removes_the_temp_when_the_library_fails(tmp_path: Path) -> None:
    target = tmp_path / "g.onnx"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert target.read_bytes() == b"old" and _names(tmp_path) == ["g.onnx"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert _names(target) == ["a"] and _names(tmp_path) == ["bundle"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("validation failed")
    assert _names(target) == ["a"] and _names(tmp_path) == ["bundle"]
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert _names(target) == ["b"] and _names(tmp_path) == ["bundle"]  # the old folder is gone too


# ---------------------------------------------------------------- sweep_stale


_WRITER = textwrap.dedent(
    """
    import sys, time
    from ultrastyle.io.atomic import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"x" * 100000)
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
    """
)


def _start_writer(target: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, cwd=REPO, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "writing"
    return p


def test_writer_killed_mid_write_leaves_a_partial_that_sweep_removes(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    p = _start_writer(target)
    try:
        partials = [q for q in tmp_path.iterdir() if writer_pid(q) == p.pid]
        assert len(partials) == 1 and partials[0].stat().st_size == 100000
        assert sweep_stale(tmp_path) == []  # its writer is alive: kept
        assert partials[0].exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert partials[0].exists()  # SIGKILL skips every cleanup
    assert sweep_stale(tmp_path) == partials
    assert _names(tmp_path) == ["out.png"] and target.read_bytes() == b"old"


def test_sweep_keeps_live_writers_and_other_programs_files(tmp_path: Path) -> None:
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = [tmp_path / f".a.{os.getpid()}.0123abcd{PARTIAL_SUFFIX}", tmp_path / f".b.{sleeper.pid}.0123abcd{PARTIAL_SUFFIX}"]
        others = [tmp_path / n for n in (".foo.partial", "x.tmp", ".x.partial-ab12cd", f".c.{dead}.0123abcd.partial",
                                         f"c.{dead}.0123abcd{PARTIAL_SUFFIX}", f".c.{dead}.0123ABCD{PARTIAL_SUFFIX}", "out.png")]  # fmt: skip
        stale_file = tmp_path / f".d.png.{dead}.0123abcd{PARTIAL_SUFFIX}"
        stale_dir = tmp_path / f".bundle.{dead}.0123abcd{PARTIAL_SUFFIX}"
        for p in [*live, *others, stale_file]:
            p.write_bytes(b"x")
        stale_dir.mkdir()
        (stale_dir / "g.onnx").write_bytes(b"x")
        assert sorted(sweep_stale(tmp_path)) == sorted([stale_file, stale_dir])
        assert _names(tmp_path) == sorted(p.name for p in [*live, *others])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sweep_keeps_another_machines_temps_until_a_day_untouched(tmp_path: Path) -> None:
    # A shared cache: a writer on another machine or in another container has a pid that means nothing here.
    dead = _dead_pid()
    other = "0123abcd" if atomic.HOST_TAG != "0123abcd" else "fedc9876"
    fresh = tmp_path / f".a.pth.{dead}@{other}.0123abcd{PARTIAL_SUFFIX}"
    old = tmp_path / f".b.pth.{dead}@{other}.0123abcd{PARTIAL_SUFFIX}"
    old_dir = tmp_path / f".bundle.{dead}@{other}.0123abcd{PARTIAL_SUFFIX}"
    ours = tmp_path / f".c.pth.{dead}@{atomic.HOST_TAG}.0123abcd{PARTIAL_SUFFIX}"
    legacy = tmp_path / f".d.pth.{dead}.0123abcd{PARTIAL_SUFFIX}"  # older ultrastyle's names: by pid, as then
    for p in (fresh, old, ours, legacy):
        p.write_bytes(b"x")
    old_dir.mkdir()
    stale = time.time() - atomic.FOREIGN_STALE_SECONDS - 60
    for p in (old, old_dir):
        os.utime(p, (stale, stale))
    assert sorted(sweep_stale(tmp_path)) == sorted([old, old_dir, ours, legacy])
    assert _names(tmp_path) == [fresh.name]


def test_sweep_removes_the_temps_of_writers_it_is_told_were_killed_on_other_machines(tmp_path: Path) -> None:
    # A Ray driver kills a busy worker on another node after Ctrl-C: its pid cannot be asked about here.
    other = "0123abcd" if atomic.HOST_TAG != "0123abcd" else "fedc9876"
    killed = tmp_path / f".a.png.4242@{other}.0123abcd{PARTIAL_SUFFIX}"
    live = tmp_path / f".b.png.4243@{other}.0123abcd{PARTIAL_SUFFIX}"  # another worker there, not killed
    for p in (killed, live):
        p.write_bytes(b"x")
    assert sweep_stale(tmp_path, dead={(other, 4242)}) == [killed]
    assert _names(tmp_path) == [live.name]


def test_partial_names_carry_this_machine(tmp_path: Path) -> None:
    p = partial_path(tmp_path / "out.png")
    assert f".{os.getpid()}@{atomic.HOST_TAG}." in p.name and writer_pid(p) == os.getpid()


def test_sweep_treats_a_pid_it_may_not_signal_as_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / f".a.{_dead_pid()}.0123abcd{PARTIAL_SUFFIX}"
    p.write_bytes(b"x")

    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")  # another user's live process

    monkeypatch.setattr(atomic.os, "kill", kill)
    assert sweep_stale(tmp_path) == [] and p.exists()


def test_sweep_of_a_missing_folder_is_a_no_op(tmp_path: Path) -> None:
    assert sweep_stale(tmp_path / "nope") == []


def test_sweep_does_not_recurse(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    p = sub / f".a.{_dead_pid()}.0123abcd{PARTIAL_SUFFIX}"
    p.write_bytes(b"x")
    assert sweep_stale(tmp_path) == [] and p.exists()



def test_a_folder_that_cannot_be_made_is_named_not_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "missing-parent" / "bundle"
    with pytest.raises(OSError, match=r"cannot create .*missing-parent/bundle") as info:
        with atomic_dir(target):
            pass
    assert PARTIAL_SUFFIX not in str(info.value)


def test_atomic_dir_over_a_file_leaves_no_partial_behind(tmp_path: Path) -> None:
    (tmp_path / "out_files").write_text("a file where the folder goes")
    with atomic_dir(tmp_path / "out_files") as tmp:
        (tmp / "0").mkdir()
    assert (tmp_path / "out_files" / "0").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_files"]  # the file it replaced is gone, not left as a partial


def _replace_many(path: str, n: int, errors) -> None:
    from ultrastyle.io.atomic import atomic_dir

    for i in range(n):
        try:
            with atomic_dir(path, fsync=False) as tmp:
                (tmp / "state.json").write_text(str(i))
        except OSError as exc:  # what two runs saving one state got: a raw "No such file", "Directory not empty"
            errors.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_replacing_one_folder_at_once_both_succeed_and_leave_it_whole(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    path = tmp_path / "state"
    workers = [ctx.Process(target=_replace_many, args=(str(path), 200, errors)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    said = []
    while not errors.empty():
        said.append(errors.get())
    assert said == [] and all(w.exitcode == 0 for w in workers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"] and (path / "state.json").is_file()  # nothing else left


def test_a_folder_that_cannot_be_swapped_in_is_named_and_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    import errno

    path = tmp_path / "state"
    path.mkdir()
    (path / "old.json").write_text("kept")
    real = os.replace

    def another_writer_always_first(src, dst):
        if Path(dst) == path and atomic.writer_pid(src) is not None and Path(src).is_dir() and (Path(src) / "new.json").exists():
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))  # its folder lands before ours, every time
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", another_writer_always_first)
    with pytest.raises(OSError, match=f"cannot replace {path} \\(Directory not empty\\)"):
        with atomic.atomic_dir(path, fsync=False) as tmp:
            (tmp / "new.json").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"] and (path / "old.json").read_text() == "kept"  # no temp names left


def test_where_pids_cannot_be_asked_about_this_machines_temps_go_by_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows: is_alive says every pid lives (os.kill(pid, 0) would end it), so a killed run's temps stayed forever."""
    monkeypatch.setattr(atomic, "PIDS_CHECKABLE", False)
    monkeypatch.setattr(atomic, "is_alive", lambda pid: pytest.fail("asked about a pid"))
    dead = _dead_pid()
    fresh, old = (tmp_path / f".{n}.png.{dead}@{atomic.HOST_TAG}.0123abcd{PARTIAL_SUFFIX}" for n in "ab")
    for p in (fresh, old):
        p.write_bytes(b"x")
    stale = time.time() - atomic.FOREIGN_STALE_SECONDS - 60
    os.utime(old, (stale, stale))
    assert sweep_stale(tmp_path) == [old] and _names(tmp_path) == [fresh.name]


def test_files_are_flushed_through_a_descriptor_windows_accepts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows' fsync needs write access: every atomic write (the first-use export, TIFF outputs) failed with EBADF."""
    import fcntl

    def windows_fsync(fd: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(atomic.os, "fsync", windows_fsync)
    monkeypatch.setattr(atomic, "FSYNC_OPEN_FLAGS", os.O_RDWR)  # as set where os.name == "nt"
    with atomic_path(tmp_path / "out.tif") as tmp:
        tmp.write_bytes(b"image")
    with atomic_dir(tmp_path / "bundle") as d:
        (d / "g.onnx").write_bytes(b"graph")
    assert (tmp_path / "out.tif").read_bytes() == b"image" and (tmp_path / "bundle" / "g.onnx").read_bytes() == b"graph"


def test_a_writer_killed_between_the_renames_of_a_folder_leaves_the_old_one_which_the_sweep_puts_back(tmp_path: Path, monkeypatch) -> None:
    """The old folder moved aside and the new one not yet in place: both were swept, and an optimization's saved state
    (hours of work) was lost. The old one is whole: it goes back; the new one may not be, and goes."""
    state = tmp_path / ".photo.optimize-state"
    state.mkdir()
    (state / "state.json").write_text("old")
    real, calls = os.replace, []

    def killed_at_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a SIGKILL has no clean-up at all: the except below only removes the new folder
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt), atomic_dir(state) as tmp:
        (tmp / "state.json").write_text("new")
    monkeypatch.undo()
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(atomic.PREVIOUS_SUFFIX)]
    assert not state.exists() and len(aside) == 1 and writer_pid(aside[0]) == os.getpid()
    assert sweep_stale(tmp_path, dead=[(atomic.HOST_TAG, os.getpid())]) == []  # put back, not removed
    assert _names(tmp_path) == [state.name] and (state / "state.json").read_text() == "old"
    # Where the new folder did take its place, the old one aside is removed.
    state.rename(aside[0])
    state.mkdir()
    assert sweep_stale(tmp_path, dead=[(atomic.HOST_TAG, os.getpid())]) == aside and _names(tmp_path) == [state.name]


def test_a_folder_removed_part_way_leaves_a_temp_name_not_a_folder_missing_files(tmp_path: Path, monkeypatch) -> None:
    """A kill while an optimization's state was deleted left its solver files without state.json under the real name,
    which every later run refused as something else's folder."""
    state = tmp_path / ".photo.optimize-state"
    (state / "solver").mkdir(parents=True)
    (state / "state.json").write_text("{}")
    monkeypatch.setattr(atomic, "_remove", lambda p: None)  # killed before any file went
    atomic.remove_tree(state)
    monkeypatch.undo()
    [left] = tmp_path.iterdir()
    assert not state.exists() and writer_pid(left) == os.getpid() and left.name.endswith(PARTIAL_SUFFIX)
    atomic.remove_tree(state)  # nothing there: nothing to do


def test_a_live_pid_of_another_start_than_the_writer_s_is_not_its_writer(tmp_path: Path) -> None:
    """After a reboot (or 32768 processes where pid_max is small) a dead writer's pid is another process's: its temp was
    kept as long as that process lived. The writer's start is in the name, in clock ticks since boot: a clock set
    forward or back changes nothing (a wall-clock comparison deleted a live writer's temp after a clock jump)."""
    if atomic.process_start_ticks(os.getpid()) is None:
        pytest.skip("no /proc here: process start times cannot be read, and a reused pid's temp is kept (by design)")
    assert f"-{atomic.process_start_ticks(os.getpid()):x}{PARTIAL_SUFFIX}" in partial_path(tmp_path / "a.png").name
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            ticks = atomic.process_start_ticks(other.pid)
            assert ticks is not None
            reused = tmp_path / f".a.png.{other.pid}@{atomic.HOST_TAG}.0123abcd-{ticks - 100:x}{PARTIAL_SUFFIX}"
            live = tmp_path / f".b.png.{other.pid}@{atomic.HOST_TAG}.0123abcd-{ticks:x}{PARTIAL_SUFFIX}"
            old_style = tmp_path / f".c.png.{other.pid}@{atomic.HOST_TAG}.0123abcd{PARTIAL_SUFFIX}"  # no start: by the pid
            for f in (reused, live, old_style):
                f.write_bytes(b"x")
                os.utime(f, (0, 0))  # any date: the clock is not asked
            assert sweep_stale(tmp_path) == [reused] and _names(tmp_path) == sorted([live.name, old_style.name])
        finally:
            other.kill()


def test_a_folder_moved_aside_goes_back_only_whole_newest_and_under_its_own_name(tmp_path: Path, monkeypatch) -> None:
    """The diff review: a superseded folder removed part-way under its "previous" name was put back, half empty, once the
    real one went; a name cut to fit came back cut; of two writers killed between their renames the older could win."""
    dead = [(atomic.HOST_TAG, os.getpid())]
    # Superseded: renamed to a plain temp name before its files go, so a kill then leaves nothing to put back.
    state = tmp_path / "state"
    state.mkdir()
    (state / "a").write_text("old")
    removed: list[Path] = []
    monkeypatch.setattr(atomic, "_remove", lambda p: removed.append(p))  # killed while removing the old one
    with atomic_dir(state) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.undo()
    assert [p.name.endswith(PARTIAL_SUFFIX) for p in removed] == [True]
    atomic.remove_tree(state)  # the real one goes on purpose
    sweep_stale(tmp_path, dead=dead)
    assert _names(tmp_path) == []  # the old one did not come back
    # Two moved aside, neither replaced: the one moved last goes back.
    for k, text in enumerate(("older", "newer")):
        d = partial_path(state, atomic.PREVIOUS_SUFFIX)
        d.mkdir()
        (d / "a").write_text(text)
        if k == 0:
            os.utime(d, (1, 1))
            time.sleep(0.05)  # a later ctime for the second
    sweep_stale(tmp_path, dead=dead)
    assert _names(tmp_path) == ["state"] and (state / "a").read_text() == "newer"
    # A name that may have been cut to fit is removed, not put back under the cut name.
    long = tmp_path / ("風" * 64 + ".optimize-state")
    aside = partial_path(long, atomic.PREVIOUS_SUFFIX)
    aside.mkdir()
    sweep_stale(tmp_path, dead=dead)
    assert _names(tmp_path) == ["state"]


def test_a_rename_into_place_is_flushed_with_its_folder(tmp_path: Path, monkeypatch) -> None:
    """The file's data was flushed before its rename, but not the rename: after a power cut the output could be gone."""
    flushed: list[Path] = []
    real = atomic._fsync_dir
    monkeypatch.setattr(atomic, "_fsync_dir", lambda folder: flushed.append(folder) or real(folder))
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"a")
    with atomic_path(tmp_path / "b.bin") as p:
        p.write_bytes(b"b")
    with atomic_dir(tmp_path / "c") as d:
        (d / "x").write_bytes(b"c")
    write_atomic(tmp_path / "d.bin", b"d", fsync=False)  # asked not to flush: neither
    assert flushed == [tmp_path] * 3
