"""Model zoo: published weights by name, downloaded once into a verified cache.

Like ``torch.hub`` for checkpoints: the registry (``zoo.json``, shipped with the
package) pins every file's URL, byte size and sha256. Files are stored flat in
``model_dir(name)`` = ``$ULTRASTYLE_HOME/models/NAME/FILE`` (default home
``~/.cache/ultrastyle``).

Getting the files:

- :func:`fetch` downloads over HTTP(S) with ``urllib``. Each file is streamed
  into a temp file next to its destination (``.FILE.partial-XXXX``), hashed
  while streaming, checked for size and sha256 and only then moved into place
  with ``os.replace``. A failed download (HTTP error, dropped connection, short
  read, timeout, wrong checksum) leaves nothing of that file behind.
- Mirror layout: with ``mirror=URL`` (or ``$ULTRASTYLE_MIRROR``) file ``FILE``
  of model ``NAME`` is fetched from ``{URL.rstrip('/')}/{NAME}/{FILE}``
  instead of its pinned URL, i.e. a mirror is a web server over a folder that
  looks like the cache's ``models/`` folder (``NAME/1SE.pth`` ...).
- :func:`import_local` copies a local copy (offline machines), with the same
  temp-file + verify + rename discipline. The source folder may hold the files
  flat, or hold a ``NAME/`` sub-folder with them (so a mirror's root works).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "ZooError",
    "UnknownModelError",
    "ChecksumError",
    "DownloadError",
    "ZooFile",
    "ZooEntry",
    "entries",
    "get_entry",
    "home_dir",
    "model_dir",
    "is_installed",
    "verify",
    "fetch",
    "import_local",
    "ensure",
    "sha256_file",
]

_REGISTRY = Path(__file__).with_name("zoo.json")
_CHUNK = 1 << 20
# A partial file untouched this long belongs to a killed process, not to a
# download in progress (those write at least every `timeout` seconds).
_STALE_PARTIAL_S = 3600.0


class ZooError(RuntimeError):
    """Base class of every model-zoo error; the message says what to do."""


class UnknownModelError(ZooError):
    """A model name that the registry does not know."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"unknown model {name!r}; known models: {', '.join(known) or '(none)'} "
            "(see: ultrastyle models list)"
        )


class ChecksumError(ZooError):
    """A file whose content is not the published one."""

    def __init__(self, file: str, expected: str, found: str, *, detail: str = "", hint: str = "") -> None:
        self.file = file
        self.expected = expected
        self.found = found
        msg = f"checksum mismatch for {file}: expected sha256 {expected}, found {found}"
        if detail:
            msg += f" ({detail})"
        msg += "; the file was not installed."
        if hint:
            msg += f" {hint}"
        super().__init__(msg)


class DownloadError(ZooError):
    """A download that could not complete (network, HTTP status, interrupted)."""

    def __init__(self, url: str, cause: str, *, model: str) -> None:
        self.url = url
        self.cause = cause
        self.model = model
        super().__init__(
            f"could not download {url}: {cause}. Retry, or pass --mirror URL (env ULTRASTYLE_MIRROR). "
            f"On an offline machine, copy the files and run: ultrastyle models import {model} DIR"
        )


@dataclass(frozen=True)
class ZooFile:
    """One published file: stored as ``model_dir(entry)/name``."""

    name: str
    url: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ZooEntry:
    """A named set of files plus what a loader needs to know about them."""

    name: str
    description: str
    license: str
    source: str
    architecture: str
    format: str
    files: tuple[ZooFile, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes."""
        return sum(f.bytes for f in self.files)


# ---------------------------------------------------------------- registry


@functools.lru_cache(maxsize=1)
def _load_registry() -> dict[str, ZooEntry]:
    try:
        data = json.loads(_REGISTRY.read_text(encoding="utf-8"))
        out: dict[str, ZooEntry] = {}
        for name, e in data["models"].items():
            files = tuple(
                ZooFile(name=f["name"], url=f["url"], sha256=f["sha256"].lower(), bytes=int(f["bytes"]))
                for f in e["files"]
            )
            out[name] = ZooEntry(
                name=name,
                description=e["description"],
                license=e["license"],
                source=e["source"],
                architecture=e["architecture"],
                format=e["format"],
                files=files,
            )
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ZooError(
            f"the model registry {_REGISTRY} is unreadable ({type(exc).__name__}: {exc}); reinstall ultrastyle"
        ) from exc


def entries() -> dict[str, ZooEntry]:
    """All registry entries by name (a fresh dict; entries are immutable)."""
    return dict(_load_registry())


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``; :class:`UnknownModelError` lists the known names."""
    reg = _load_registry()
    try:
        return reg[name]
    except KeyError:
        raise UnknownModelError(name, sorted(reg)) from None


# ---------------------------------------------------------------- locations


def home_dir() -> Path:
    """``$ULTRASTYLE_HOME`` (read at each call), default ``~/.cache/ultrastyle``."""
    env = os.environ.get("ULTRASTYLE_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ultrastyle"


def model_dir(name: str) -> Path:
    """Where the files of model ``name`` live (whether installed or not)."""
    entry = get_entry(name)  # validates the name, so it cannot escape the cache
    return home_dir() / "models" / entry.name


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_installed(name: str) -> bool:
    """True when every file is present with the right size (no hashing: cheap)."""
    entry = get_entry(name)
    d = model_dir(name)
    for f in entry.files:
        try:
            if (d / f.name).stat().st_size != f.bytes:
                return False
        except OSError:
            return False
    return True


def _file_problem(entry: ZooEntry, f: ZooFile, path: Path) -> str | None:
    """One human-readable problem with an installed file, or None if it is intact."""
    if not path.is_file():
        return f"{entry.name}/{f.name}: missing (expected at {path})"
    size = path.stat().st_size
    if size != f.bytes:
        return f"{entry.name}/{f.name}: size {size} bytes, expected {f.bytes} ({path})"
    found = sha256_file(path)
    if found != f.sha256:
        return f"{entry.name}/{f.name}: sha256 {found}, expected {f.sha256} ({path})"
    return None


def verify(name: str) -> list[str]:
    """Hash every file of ``name``; one line per problem, ``[]`` when all is well."""
    entry = get_entry(name)
    d = model_dir(name)
    return [p for f in entry.files if (p := _file_problem(entry, f, d / f.name)) is not None]


# ---------------------------------------------------------------- atomic writes


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _prepare_dir(d: Path) -> None:
    """Create the model directory, turning permission problems into a ZooError."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(
            f"cannot create the model directory {d} ({exc.strerror or exc}); "
            "set ULTRASTYLE_HOME to a writable folder"
        ) from exc
    if not os.access(d, os.W_OK):
        raise ZooError(f"the model directory {d} is not writable; set ULTRASTYLE_HOME to a writable folder")
    _clean_stale_partials(d)


def _clean_stale_partials(d: Path) -> None:
    # SIGKILL or power loss can skip our cleanup; don't let those pile up.
    now = time.time()
    for p in d.glob(".*.partial-*"):
        try:
            if now - p.stat().st_mtime > _STALE_PARTIAL_S:
                p.unlink()
        except OSError:
            pass


@contextmanager
def _atomic_target(dest: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """Yield an open temp file beside ``dest``; the caller commits via ``os.replace``.

    Whatever happens inside the block (errors, KeyboardInterrupt), the temp file
    is gone afterwards unless it was already renamed onto ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
    finally:
        _unlink(tmp)


def _commit(fh: BinaryIO, tmp: Path, dest: Path) -> None:
    fh.flush()
    os.fsync(fh.fileno())  # the rename must not expose an empty file after a crash
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; weights are not secret
    os.replace(tmp, dest)


def _needs_install(entry: ZooEntry, f: ZooFile, dest: Path, force: bool) -> bool:
    """Decide whether ``dest`` must be (re)written; drop it if it is corrupt.

    A corrupt file is removed up front so that a failed re-download never
    leaves it behind looking installed. A good file is kept under ``force``
    until its replacement has been verified.
    """
    if not dest.exists():
        return True
    if _file_problem(entry, f, dest) is None:
        return force
    _unlink(dest)
    return True


# ---------------------------------------------------------------- download


def _mirror_url(mirror: str, entry: ZooEntry, f: ZooFile) -> str:
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(entry.name)}/{urllib.parse.quote(f.name)}"


def _check_url(url: str, model: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(
            url, f"unsupported URL scheme {scheme or '(none)'!r}, expected http:// or https:// "
            "(for a local folder use `ultrastyle models import`)",
            model=model,
        )


class _Progress:
    """A rich progress bar on stderr (bytes, speed), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),  # stdout stays clean for `models path` & co.
                transient=False,
            )

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._bar is None:
            return lambda n: None
        bar = self._bar
        tid = bar.add_task(description, total=total)
        return lambda n: bar.advance(tid, n)


def _download(entry: ZooEntry, f: ZooFile, url: str, dest: Path, timeout: float, advance: Callable[[int], None]) -> None:
    """Stream ``url`` into ``dest`` atomically, checking size and sha256."""
    _check_url(url, entry.name)
    req = urllib.request.Request(url, headers={"User-Agent": "ultrastyle-model-zoo"})
    with _atomic_target(dest) as (fh, tmp):
        h = hashlib.sha256()
        got = 0
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                announced = resp.headers.get("Content-Length")
                announced_n = int(announced) if announced and announced.isdigit() else None
                while True:
                    # Read at most one byte past the expected size: enough to tell
                    # a too-long file, never enough to fill the disk.
                    chunk = resp.read(min(_CHUNK, f.bytes + 1 - got))
                    if not chunk:
                        break
                    fh.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    advance(len(chunk))
                    if got > f.bytes:
                        break
        except urllib.error.HTTPError as exc:
            raise DownloadError(url, f"HTTP {exc.code} {exc.reason}", model=entry.name) from exc
        except urllib.error.URLError as exc:
            raise DownloadError(url, f"{exc.reason}", model=entry.name) from exc
        except TimeoutError as exc:
            raise DownloadError(url, f"timed out after {timeout:g} s (received {got} of {f.bytes} bytes)", model=entry.name) from exc
        except OSError as exc:  # connection reset, http.client.IncompleteRead, ...
            raise DownloadError(url, f"{type(exc).__name__}: {exc} (received {got} of {f.bytes} bytes)", model=entry.name) from exc
        except ValueError as exc:  # http.client raises e.g. for a malformed chunked body
            raise DownloadError(url, f"bad response: {exc}", model=entry.name) from exc

        # http.client returns b"" instead of raising when a connection drops
        # before Content-Length bytes arrived, so compare counts ourselves.
        digest = h.hexdigest()
        if got < f.bytes and (announced_n is None or got < announced_n):
            total = announced_n if announced_n is not None else f.bytes
            raise DownloadError(url, f"connection closed after {got} of {total} bytes", model=entry.name)
        if got != f.bytes:
            raise ChecksumError(
                f"{entry.name}/{f.name}", f.sha256, digest if got < f.bytes else "(not computed: file too long)",
                detail=f"{'more than ' if got > f.bytes else ''}{min(got, f.bytes)} bytes from {url}, expected {f.bytes}",
                hint="The server sent a different file; check the URL or mirror.",
            )
        if digest != f.sha256:
            raise ChecksumError(
                f"{entry.name}/{f.name}", f.sha256, digest, detail=f"downloaded from {url}",
                hint="The server sent a different or corrupted file; retry, or use another mirror.",
            )
        _commit(fh, tmp, dest)


def fetch(
    name: str,
    *,
    mirror: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download model ``name`` into :func:`model_dir` and return that directory.

    Files already present and verified are skipped (``force=True`` downloads
    them again, replacing each only once its new copy is verified). ``mirror``
    (default ``$ULTRASTYLE_MIRROR``) replaces each pinned URL by
    ``{mirror}/{name}/{file}``. ``timeout`` is per connect / read, in seconds.
    Stops at the first failure with :class:`DownloadError` or
    :class:`ChecksumError`; files verified before it stay installed, and
    nothing of the failing file is left.
    """
    entry = get_entry(name)
    if mirror is None:
        mirror = os.environ.get("ULTRASTYLE_MIRROR") or None
    d = model_dir(name)
    _prepare_dir(d)
    todo = [f for f in entry.files if _needs_install(entry, f, d / f.name, force)]
    with _Progress(progress and bool(todo)) as bar:
        for f in todo:
            url = _mirror_url(mirror, entry, f) if mirror else f.url
            _download(entry, f, url, d / f.name, timeout, bar.task(f"{entry.name}/{f.name}", f.bytes))
    return d


# ---------------------------------------------------------------- local import


def _find_source(entry: ZooEntry, src: Path) -> dict[str, Path]:
    """Map each file name to its path under ``src`` (flat, or in ``src/NAME/``)."""
    if not src.is_dir():
        raise ZooError(f"{src} is not a directory; pass the folder that holds {entry.files[0].name} etc.")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for f in entry.files:
        for cand in (src / f.name, src / entry.name / f.name):
            if cand.is_file():
                found[f.name] = cand
                break
        else:
            missing.append(f.name)
    if missing:
        raise ZooError(
            f"{src} lacks {len(missing)} of the {len(entry.files)} files of {entry.name}: {', '.join(missing)} "
            f"(looked in {src} and {src / entry.name}); copy all of them there and retry"
        )
    return found


def import_local(name: str, src: Path, *, force: bool = False) -> Path:
    """Install model ``name`` from local copies in ``src`` and return its directory.

    For offline machines. ``src`` holds the files flat (``1SE.pth`` ...) or in
    ``src/NAME/``. Each file is copied to a temp file, hashed on the way, and
    renamed into place only if its sha256 matches; otherwise
    :class:`ChecksumError` (naming the file, expected and found sha256) and
    nothing of that file is left. Files already installed and verified are
    skipped unless ``force``.
    """
    entry = get_entry(name)
    src = Path(src).expanduser()
    sources = _find_source(entry, src)
    d = model_dir(name)
    _prepare_dir(d)
    for f in entry.files:
        dest = d / f.name
        if dest.exists() and sources[f.name].resolve() == dest.resolve():
            continue  # importing the cache into itself: _needs_install would delete a corrupt source
        if not _needs_install(entry, f, dest, force):
            continue
        with _atomic_target(dest) as (fh, tmp):
            h = hashlib.sha256()
            with open(sources[f.name], "rb") as s:
                for chunk in iter(lambda: s.read(_CHUNK), b""):
                    fh.write(chunk)
                    h.update(chunk)
            digest = h.hexdigest()
            if digest != f.sha256:
                raise ChecksumError(
                    f"{entry.name}/{f.name}", f.sha256, digest, detail=f"source {sources[f.name]}",
                    hint="Copy the file again from a trusted source.",
                )
            _commit(fh, tmp, dest)
    problems = verify(name)
    if problems:  # e.g. the cache dir was modified concurrently
        raise ZooError(f"{name} failed verification after import: {'; '.join(problems)}")
    return d


def ensure(name: str, *, mirror: str | None = None, progress: bool = True) -> Path:
    """The directory of model ``name``, fetching it first if it is not installed.

    Only sizes are checked here (first use must be cheap); run :func:`verify`
    or ``ultrastyle models verify`` for a full check.
    """
    if is_installed(name):
        return model_dir(name)
    return fetch(name, mirror=mirror, progress=progress)

