"""Atomic writes and the sweep of temp files that killed writers left behind.

Every file or folder this tool writes goes first to a hidden temp beside its
target, named ``.{name}.{pid}@{host}.{token}.ultrastyle-partial`` (``pid`` is
the writer's process id, ``host`` 8 hex digits naming its machine and process
namespace, ``token`` 8 random hex digits), and is renamed onto the target
(``os.replace``) only once complete and fsynced. An exception,
KeyboardInterrupt included (Ctrl-C; SIGTERM to the command line), removes the temp. Only SIGKILL or a power cut can
leave one; :func:`sweep_stale` removes those whose writer is no longer alive.
A folder shared by several machines or containers (a network cache, a Ray
cluster's outputs) holds temps of writers whose pids mean nothing here: those
are removed only once untouched for :data:`FOREIGN_STALE_SECONDS`.

Pure standard library (no torch), so any module can use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FOREIGN_STALE_SECONDS",
    "PARTIAL_SUFFIX",
    "PREVIOUS_SUFFIX",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "disk_full",
    "is_alive",
    "is_unwritable",
    "partial_path",
    "process_start_ticks",
    "remove_tree",
    "sweep_stale",
    "write_atomic",
    "writer_pid",
]

PARTIAL_SUFFIX = ".ultrastyle-partial"
# A whole folder moved aside for its replacement (`atomic_dir`): a writer killed before the replacement took its place
# leaves it, and the sweep puts it back rather than removing it (the state of a long optimization, say).
PREVIOUS_SUFFIX = ".ultrastyle-previous"
# The exact shape of our temp names; nothing else is ever swept.
# The host part is optional: older ultrastyle wrote ".{name}.{pid}.{token}", judged by the pid alone as then.
# The token may carry the writer's start time (clock ticks since boot, hex): a live process of that pid that started at
# another time is not the writer (pids are reused), whatever the wall clock did meanwhile.
_PARTIAL_RE = re.compile(r"\.(?P<name>.+)\.(?P<pid>[1-9][0-9]{0,9})(?:@(?P<host>[0-9a-f]{8}))?\.(?P<token>[0-9a-f]{8})"
                         r"(?:-(?P<start>[0-9a-f]{1,16}))?\.ultrastyle-(?P<kind>partial|previous)")  # fmt: skip
# Keeps ".{name}.{pid}@{host}.{token}-{start}.ultrastyle-previous" under the usual 255-byte name limit.
_MAX_NAME_BYTES = 180
# A temp of another machine's writer (its pid cannot be asked about here) untouched this long is taken as dead: a
# download or export in progress writes far more often than once a day.
FOREIGN_STALE_SECONDS = 24 * 3600


def _host_tag() -> str:
    """8 hex digits naming this machine and pid namespace: containers on one host each see their own pids."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\n{namespace}".encode()).hexdigest()[:8]


HOST_TAG = _host_tag()


def partial_path(path: str | Path, suffix: str = PARTIAL_SUFFIX) -> Path:
    """A fresh temp name beside ``path`` in this tool's pattern, carrying this process's pid and machine (``suffix``:
    `PREVIOUS_SUFFIX` for a whole folder moved aside, which a sweep restores where nothing took its place)."""
    path = Path(path)
    name = path.name
    if len(name.encode()) > _MAX_NAME_BYTES:
        name = name.encode()[:_MAX_NAME_BYTES].decode(errors="ignore")
    start = process_start_ticks(os.getpid())
    token = secrets.token_hex(4) + ("" if start is None else f"-{start:x}")
    return path.with_name(f".{name}.{os.getpid()}@{HOST_TAG}.{token}{suffix}")


def remove_tree(path: str | Path) -> None:
    """Remove folder ``path`` (or a file) so that a kill part-way leaves a temp name a sweep removes, not a folder
    without some of its files under the real name (which a later run would take for something else's), nor under a
    name the sweep puts back (`PREVIOUS_SUFFIX`). Where it cannot be renamed, removed in place."""
    path = Path(path)
    m = _PARTIAL_RE.fullmatch(path.name)
    aside = partial_path(path.with_name(m["name"]) if m else path)  # short: named after what it stood for
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    except OSError:  # (Windows, a file inside still open)
        _remove(path)
        return
    _remove(aside)


def writer_pid(path: str | Path) -> int | None:
    """The writer's pid if ``path``'s name is one of this tool's temp names, else None."""
    m = _PARTIAL_RE.fullmatch(Path(path).name)
    return int(m["pid"]) if m else None


# Windows' fsync (FlushFileBuffers) needs a handle open for writing ("Bad file descriptor" on a read-only one); POSIX
# takes any descriptor.
FSYNC_OPEN_FLAGS = os.O_RDWR | getattr(os, "O_BINARY", 0) if os.name == "nt" else os.O_RDONLY


def _fsync_file(path: Path) -> None:
    fd = os.open(path, FSYNC_OPEN_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries, so a rename into it survives a power cut (POSIX; where a file system refuses, skipped)."""
    if os.name == "nt":  # no folder can be opened there to flush; NTFS journals its renames
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL on some file systems: nothing to flush there
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():  # read-only folders inside (a bundle made read-only, swapped out): ours now, made writable
                _make_writable(path)
                shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _make_writable(top: Path) -> None:
    """``top`` and every folder under it writable and searchable by their owner (nothing above ``top`` is touched)."""
    for root, dirs, _ in os.walk(top):  # top-down: a folder is opened after it was made readable
        for d in (root, *(os.path.join(root, x) for x in dirs)):
            try:
                if not os.path.islink(d):
                    os.chmod(d, os.stat(d).st_mode | stat.S_IRWXU)
            except OSError:
                pass


@contextmanager
def atomic_write(
    path: str | Path, mode: str = "wb", *, encoding: str | None = None, newline: str | None = None, fsync: bool = True
) -> Iterator[IO[Any]]:
    """Yield a file open on a temp beside ``path``; renamed onto ``path`` when the block ends cleanly.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` default utf-8). If the
    block raises, the temp is removed and ``path`` is left as it was. The
    parent folder must exist. The file honours the umask (unlike mkstemp's 0600).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = partial_path(path)
    if mode == "w":
        f = open(tmp, "x", encoding=encoding or "utf-8", newline=newline)  # noqa: SIM115 - closed below
    else:
        f = open(tmp, "xb")  # noqa: SIM115 - closed below
    try:
        with f:
            yield f
            f.flush()
            if fsync:  # the rename must never expose a file whose data is not on disk yet
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for libraries that write by name (torch.save, onnx.save, PIL, ...).

    The library must create the file; it is renamed onto ``path`` when the
    block ends cleanly and removed if the block raises. Libraries that pick
    the format from the file name need it given explicitly: the temp name
    ends in ``.ultrastyle-partial``.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, path: Path, tries: int = 5, aside: str = PREVIOUS_SUFFIX) -> list[Path]:
    """Rename folder ``tmp`` to ``path``, moving what stands there aside first; the names moved aside, to remove.

    Another writer of the same folder (two runs saving one state) may move it away between the renames, or put its own
    in place: the last writer wins, where a raw "No such file" or "Directory not empty" failed one of them.
    """
    moved: list[Path] = []
    for attempt in range(tries):
        if os.path.lexists(path):
            old = partial_path(path, aside)  # a crash before the next rename: sweep_stale puts it back (`PREVIOUS_SUFFIX`)
            try:
                os.replace(path, old)
                moved.append(old)
            except FileNotFoundError:  # another writer moved it aside first
                pass
        try:
            os.replace(tmp, path)
            return moved
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt + 1 < tries:  # another writer's folder came in between
                continue
            if moved and not os.path.lexists(path):
                os.replace(moved.pop(), path)  # the last that stood there, back
            for old in moved:  # superseded: not left under this process's temp names
                with contextlib.suppress(OSError):
                    remove_tree(old)
            raise OSError(exc.errno, f"cannot replace {path} ({exc.strerror})", str(path)) from exc
    raise AssertionError("unreachable")


@contextmanager
def atomic_dir(path: str | Path, *, fsync: bool = True, superseded: list[Path] | None = None,
               restorable: bool = True) -> Iterator[Path]:  # fmt: skip
    """Yield a new empty temp folder beside ``path``; it replaces ``path`` (folder or absent) on a clean exit.

    An existing ``path`` is swapped out by renames, so ``path`` is always
    either the old folder or the complete new one (a kill between the renames
    leaves the old one aside, which `sweep_stale` puts back unless not
    ``restorable``: a folder useless alone), then removed; or, given
    ``superseded``, listed there for the caller to remove (`remove_tree`) once
    its other files are in place too. If the block raises, the temp folder is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = partial_path(path)
    try:
        os.mkdir(tmp)  # honours the umask (mkdtemp's 0700 would survive the rename)
    except OSError as exc:  # name the folder asked for, not our temp name beside it
        raise OSError(exc.errno, f"cannot create {path} ({exc.strerror})", str(path)) from None
    try:
        yield tmp
        if fsync:  # every file, in subfolders too: a power cut after the rename must not leave short files in place
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync_file(p)
        gone = _swap_in(tmp, path, aside=PREVIOUS_SUFFIX if restorable else PARTIAL_SUFFIX)
        if fsync:
            _fsync_dir(path.parent)
        if superseded is not None:
            superseded.extend(gone)
            gone = []
        for old in gone:
            try:
                remove_tree(old)  # a folder, or a file that stood where the folder goes
            except OSError:
                pass  # the new folder is in place; what is left has our pattern, and sweep_stale removes it
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | str, *, fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or str as utf-8, its line endings as given on every platform) to ``path`` atomically;
    returns ``path``. (Text mode turned a CSV's ``\r\n`` into ``\r\r\n`` on Windows.)"""
    path = Path(path)
    with atomic_write(path, "wb", fsync=fsync) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def is_unwritable(exc: OSError) -> bool:
    """Whether ``exc`` says the place cannot be written (permissions, or a read-only mount), rather than some other failure."""
    return isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or its causes) that says the disk or the user's quota is full, else None:
    every later write to that disk fails too, unlike one file's error (EFBIG is a per-file limit)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


# Whether a pid can be asked about here: not on Windows (os.kill(pid, 0) would end the process), where this machine's temp
# files are judged by age, as another machine's are.
PIDS_CHECKABLE = os.name != "nt"


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` may be alive on this machine (undecidable counts as alive: its files are kept)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists but not ours, or undecidable: never remove a live writer's file
    return True


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` of this machine started, in clock ticks since boot (Linux's /proc; None elsewhere): unlike a
    wall-clock time, it does not move when the clock is set."""
    cached = _START_TICKS.get(pid) if pid == os.getpid() else None
    if cached is not None:
        return cached
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, starttime: after the command's parentheses
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid():  # a forked child has its own pid: its own entry
        _START_TICKS[pid] = ticks
    return ticks


_START_TICKS: dict[int, int] = {}


def _is_stale(entry: os.DirEntry[str], dead: Collection[tuple[str, int]]) -> bool:
    m = _PARTIAL_RE.fullmatch(entry.name)
    if m is None:
        return False
    if m["host"] is not None and (m["host"], int(m["pid"])) in dead:
        return True
    if m["host"] in (None, HOST_TAG) and PIDS_CHECKABLE:
        pid = int(m["pid"])
        if not is_alive(pid):
            return True
        # A live pid whose process started at another time than the writer's is not the writer: pids are reused, after
        # a reboot, or after 32768 processes where pid_max is small. (Names without the start: judged by the pid alone.)
        return m["start"] is not None and process_start_ticks(pid) not in (None, int(m["start"], 16))
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_STALE_SECONDS
    except OSError:
        return False


def _ctime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_ctime
    except OSError:
        return 0.0


def _restore(previous: Path) -> bool:
    """Put a folder moved aside by a dead writer (`PREVIOUS_SUFFIX`) back where nothing took its place; whether it was."""
    m = _PARTIAL_RE.fullmatch(previous.name)
    assert m is not None
    target = previous.with_name(m["name"])
    # A name that may have been cut (`partial_path`; by up to a character, 4 bytes), or a folder superseded: removed.
    if len(m["name"].encode()) > _MAX_NAME_BYTES - 4 or os.path.lexists(target):
        return False
    try:
        os.rename(previous, target)
    except OSError:
        return False
    return True


def sweep_stale(folder: str | Path, *, dead: Collection[tuple[str, int]] = ()) -> list[Path]:
    """Remove this tool's temp files and folders in ``folder`` (not recursive) whose writer has died.

    Only names of the exact pattern ``.{name}.{pid}@{host}.{token}.ultrastyle-partial``
    (or ``-previous``: a whole folder moved aside, put back as ``name`` where nothing
    stands there, else removed) are considered. One of this machine whose pid is a live process is kept;
    one of another machine (or container), or of this one where pids cannot be asked
    about (Windows), is kept until untouched for
    :data:`FOREIGN_STALE_SECONDS`, unless ``dead`` lists its (host, pid): a
    writer the caller killed (a Ray worker on another node). Missing
    ``folder`` or unremovable entries are ignored. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    # Folders moved aside first, the last moved first (rename sets ctime): of two writers killed between their renames,
    # the newer state goes back, and the older is then superseded.
    entries.sort(key=lambda e: -_ctime(e) if e.name.endswith(PREVIOUS_SUFFIX) else math.inf)
    for e in entries:
        if not _is_stale(e, dead):
            continue
        p = Path(e.path)
        if e.name.endswith(PREVIOUS_SUFFIX) and _restore(p):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                _remove(p)  # read-only folders inside too
                if p.exists():
                    continue
            else:
                p.unlink()
        except FileNotFoundError:
            pass  # another sweeper was first
        except OSError:
            continue
        removed.append(p)
    return removed
