"""Model zoo: published and packaged weights by name, installed once into a verified cache.

Like ``torch.hub`` for checkpoints. Which models exist, and each file's byte
size, sha256 and source (``"url"``, ``"package"`` or ``"from"``), is
`ultrastyle.models.registry`'s business: see it for the ``zoo.json`` schema.
Its public names (:class:`ZooEntry`, :class:`ZooFile`, :func:`entries`,
:func:`get_entry`, :class:`ZooError`, ...) are re-exported here, so
``from ultrastyle.models import zoo`` is all a caller needs; this module
installs what the registry describes and checks what is installed.

Files are stored flat in ``model_dir(name)`` = ``$ULTRASTYLE_HOME/models/NAME/FILE``
(default home ``~/.cache/ultrastyle``). Packaged (``"package"``) files are
read from :func:`weights_dir` (``ultrastyle/models/weights/`` in the package).

Getting the files:

- :func:`fetch` installs every file that is missing or damaged. URL files are
  streamed into a temp file next to their destination
  (`ultrastyle.io.atomic`: ``.FILE.PID@HOST.TOKEN-START.ultrastyle-partial``, swept by
  the next fetch or import once its writer is dead), hashed while streaming,
  checked for size and sha256 and only then moved into place with ``os.replace``; packaged and
  derived files are copied the same way (a derived file's source model is
  installed first). A failed download (HTTP error, dropped connection, short
  read, timeout, wrong checksum) or copy leaves nothing of that file behind.
- Mirror layout: with ``mirror=URL`` (or ``$ULTRASTYLE_MIRROR``) URL file
  ``FILE`` of model ``NAME`` is fetched from ``{URL.rstrip('/')}/{NAME}/{FILE}``
  instead of its pinned URL, i.e. a mirror is a web server over a folder that
  looks like the cache's ``models/`` folder (``NAME/1SE.pth`` ...).
- :func:`import_local` copies local copies of the URL files (offline
  machines), with the same temp-file + verify + rename discipline, and
  installs packaged and derived files as :func:`fetch` does (a model whose
  files are reused and is not installed is imported from the same folder).
  The source folder may hold the files flat, or hold a ``NAME/`` sub-folder
  with them (so a mirror's root works).
- :func:`ensure` returns the model's directory, fetching it first where a
  file is missing or is an earlier release's version (:func:`is_outdated`,
  zoo.json's ``earlier_sha256``: replaced, not refused), then checks every
  file's sha256 (:func:`check_installed`, once per process): a damaged file
  (its size or its sha256 changed) is refused with :class:`DamagedModelError`
  naming the repair, never replaced without a word.
  :func:`verify` hashes every file afresh and lists what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from ultrastyle.errors import Placeholder, Remedies, Remedy, remedied
from ultrastyle.io.atomic import atomic_write, disk_full, sweep_stale
from ultrastyle.io.digest import CHUNK, remember, sha256_file, sha256_file_cached
from ultrastyle.models.registry import (
    SOURCE_KINDS,
    UnknownModelError,
    ZooEntry,
    ZooError,
    ZooFile,
    entries,
    get_entry,
)

__all__ = [
    "ZooError",
    "UnknownModelError",
    "ChecksumError",
    "SourceFolderError",
    "DamagedModelError",
    "DownloadError",
    "ZooFile",
    "ZooEntry",
    "SOURCE_KINDS",
    "entries",
    "get_entry",
    "home_dir",
    "model_dir",
    "InstallStatus",
    "install_status",
    "is_installed",
    "is_outdated",
    "verify",
    "fetch",
    "import_local",
    "ensure",
    "check_installed",
    "check_mirror",
    "reinstall",
    "reinstall_text",
    "sha256_file",
    "sha256_file_cached",
    "weights_dir",
]

# This project's own weights ("package" sources), shipped as package data.
_WEIGHTS = Path(__file__).with_name("weights")
# Legacy temp names (``.FILE.partial-XXXX``, before `ultrastyle.io.atomic`) carry
# no pid: one untouched this long belongs to a killed process, not to a
# download in progress (those write at least every `timeout` seconds).
_STALE_PARTIAL_S = 3600.0


class SourceFolderError(ZooError):
    """A folder to import from that is not one: a bad argument, refused before anything is read."""


class ChecksumError(ZooError):
    """A file whose content is not the published one."""

    def __init__(self, file: str, expected: str, found: str, *, detail: str = "", hint: str = "", remedy: Remedies = None) -> None:
        self.file = file
        self.expected = expected
        self.found = found
        self.remedy = remedy
        msg = f"checksum mismatch for {file}: expected sha256 {expected}, found {found}"
        if detail:
            msg += f" ({detail})"
        msg += "; the file was not installed."
        if hint:
            msg += f" {hint}"
        if isinstance(remedy, Remedy):  # several remedies: the hint says them
            msg += f" Fetch it again: {remedy.python()}"
        super().__init__(msg)


class DamagedModelError(ZooError):
    """An installed model file whose size or sha256 is not the registry's; it is refused before use.

    ``damaged`` lists ``(file name, path, expected, found)`` per bad file;
    ``repair`` says how to reinstall it, and ``remedy`` holds those calls (`errors.Remedy`).
    """

    def __init__(self, model: str, damaged: list[tuple[str, Path, str, str]], repair: str, remedy: Remedies = None) -> None:
        self.model = model
        self.damaged = damaged
        self.repair = repair
        self.remedy = remedy
        what = "; ".join(f"{model}/{name} at {path}: expected {exp}, found {found}" for name, path, exp, found in damaged)
        super().__init__(
            f"installed model {model} is damaged and was not used ({what}). "
            f"Reinstall it with: {repair}"
        )


class DownloadError(ZooError):
    """A download that could not complete (network, HTTP status, interrupted)."""

    def __init__(self, url: str, cause: str, *, model: str, mirror: str | None = None) -> None:
        self.url = url
        self.cause = cause
        self.model = model
        via, offline = Remedy("fetch_model", (model,), (("mirror", Placeholder("URL")),)), _import_remedy(model)
        self.remedy = (via, offline)
        if mirror is not None:  # the mirror is the suspect, not the network alone: say what it must serve
            advice = (f"The mirror {mirror} must serve each file at MIRROR/NAME/FILE: check that it holds {model}/{url.rsplit('/', 1)[-1]}, "
                      "or fetch without the mirror")  # fmt: skip
        else:
            advice = f"Retry, or fetch it from a mirror (ULTRASTYLE_MIRROR=URL, or {via.python()})"
        try:
            names = [f.name for f in get_entry(model).files if f.kind == "url"]
        except ZooError:
            names = []
        files = f"its {len(names)} file(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else "its files"
        super().__init__(f"could not download {url}: {cause}. {advice}. On a machine without internet access, copy {files} from "
                         f"one that has it into a folder DIR here and import them: {offline.python()}")  # fmt: skip


def _import_remedy(model: str) -> Remedy:
    return Remedy("import_model", (model, Placeholder("DIR")))


def reinstall(name: str) -> tuple[Remedy, ...]:
    """The calls that (re)install model ``name``: `fetch`, and `import_local` where it has files to download."""
    entry = get_entry(name)
    fetch_it = Remedy("fetch_model", (entry.name,))
    return (fetch_it, _import_remedy(entry.name)) if any(f.kind == "url" for f in entry.files) else (fetch_it,)


def reinstall_text(name: str) -> str:
    """`reinstall` in words: ``fetch(...)  (offline: import_local(...))``."""
    calls = reinstall(name)
    if len(calls) == 2:
        return f"{calls[0].python()}  (offline: {calls[1].python()})"
    return f"{calls[0].python()}  (nothing is downloaded: its files ship with ultrastyle or come from installed models)"


# ---------------------------------------------------------------- locations


def home_dir() -> Path:
    """``$ULTRASTYLE_HOME`` (read at each call), default ``~/.cache/ultrastyle``.

    A relative ``$ULTRASTYLE_HOME`` is refused (`ZooError`): the cache would be
    another folder in every working directory, and a model installed from one
    missing in the next.
    """
    env = os.environ.get("ULTRASTYLE_HOME")
    if env is None or env == "":
        return Path.home() / ".cache" / "ultrastyle"
    home = Path(env).expanduser()
    if not home.is_absolute():  # " " too
        raise ZooError(f"ULTRASTYLE_HOME={env!r} is not an absolute path: the model cache would move with the working "
                       f"folder; set it to one, such as {str(Path(env.strip() or 'ultrastyle').absolute())!r}")  # fmt: skip
    return home


def bundles_dir() -> Path:
    """The cache of ONNX bundles exported from models on first use (``NAME-DIGEST``: the digest of the weights exported)."""
    return home_dir() / "bundles"


def cached_bundles(name: str) -> list[Path]:
    """The cached bundles exported from zoo model ``name``, sorted: named for it (any digest), and every source weight
    in their manifest one of its files (this release's or an earlier one's). A weights folder of the same name (a copy
    being fine-tuned) exports bundles of the same name: those are the user's, not listed."""
    entry, d = get_entry(name), bundles_dir()
    if not d.is_dir():
        return []
    known = {f.name: {f.sha256, *f.earlier_sha256} for f in entry.files}
    pattern = re.compile(re.escape(entry.name) + r"-[0-9a-f]{12}")
    found = []
    for p in d.iterdir():
        if not pattern.fullmatch(p.name) or not p.is_dir():
            continue
        try:
            weights = json.loads((p / "manifest.json").read_text(encoding="utf-8")).get("source_weights")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: not known to be this model's
        if isinstance(weights, dict) and weights and all(v in known.get(k, ()) for k, v in weights.items()):
            found.append(p)
    return sorted(found)


def weights_dir() -> Path:
    """The folder of this project's own weights shipped in the package (``"package"`` sources)."""
    return _WEIGHTS


def model_dir(name: str) -> Path:
    """Where the files of model ``name`` live (whether installed or not)."""
    entry = get_entry(name)  # validates the name, so it cannot escape the cache
    return home_dir() / "models" / entry.name


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
    if path.is_dir():
        return f"{entry.name}/{f.name}: a folder where the file goes ({path}); move it away"
    if not path.is_file():
        return f"{entry.name}/{f.name}: missing (expected at {path})"
    size = path.stat().st_size
    if size != f.bytes:
        return f"{entry.name}/{f.name}: size {size} bytes, expected {f.bytes} ({path})"
    found = sha256_file(path)
    if found in f.earlier_sha256:
        return f"{entry.name}/{f.name}: an earlier ultrastyle release's version ({path})"
    if found != f.sha256:
        return f"{entry.name}/{f.name}: sha256 {found}, expected {f.sha256} ({path})"
    return None


InstallStatus = Literal["installed", "absent", "incomplete", "outdated", "damaged"]


def install_status(name: str) -> InstallStatus:
    """What the cache holds of ``name``, every present file hashed (remembered per process).

    ``installed``: every file verified; ``absent``: none of its files;
    ``incomplete``: some missing, the rest verified (an interrupted install:
    installing again finishes it); ``outdated``: an earlier release's files
    (replaced on use); ``damaged``: a file of the wrong size or sha256.
    """
    entry, d = get_entry(name), model_dir(name)
    missing = sum(not (d / f.name).exists() for f in entry.files)
    if missing == len(entry.files):
        return "absent"
    if _damaged_present(name):  # before outdated: a damaged file is refused on use (`ensure`), an outdated one replaced
        return "damaged"
    if is_outdated(name):
        return "outdated"
    return "incomplete" if missing else "installed"


def is_outdated(name: str) -> bool:
    """True when an installed file is an earlier release's version of it (its registry ``earlier_sha256``)."""
    entry = get_entry(name)
    d = model_dir(name)
    return any(f.earlier_sha256 and (d / f.name).is_file() and sha256_file_cached(d / f.name) in f.earlier_sha256
               for f in entry.files)  # fmt: skip


def check_installed(name: str) -> Path:
    """The directory of installed model ``name`` once every file's size and sha256 match the registry.

    Raises :class:`DamagedModelError` naming each bad file, what was expected
    and found, and the repair command. Digests are remembered per process
    (:func:`sha256_file_cached`), so checking before each use costs one hash.
    """
    entry = get_entry(name)
    d = model_dir(name)
    damaged: list[tuple[str, Path, str, str]] = []
    for f in entry.files:
        path = d / f.name
        try:
            size = path.stat().st_size
        except OSError:
            damaged.append((f.name, path, f"{f.bytes} bytes", "no file"))
            continue
        if size != f.bytes:
            damaged.append((f.name, path, f"{f.bytes} bytes", f"{size} bytes"))
            continue
        found = sha256_file_cached(path)
        if found != f.sha256:
            damaged.append((f.name, path, f"sha256 {f.sha256}", f"sha256 {found}"))
    if len(damaged) == len(entry.files) and all(found == "no file" for *_, found in damaged):  # nothing there: never installed
        raise remedied(ZooError(f"{entry.name} is not installed (no file of it in {d}); install it: {reinstall_text(entry.name)}"),
                       reinstall(entry.name))  # fmt: skip
    if damaged:
        raise DamagedModelError(entry.name, damaged, reinstall_text(entry.name), reinstall(entry.name))
    return d


def verify(name: str) -> list[str]:
    """Hash every file of ``name``; one line per problem, ``[]`` when all is well."""
    entry = get_entry(name)
    d = model_dir(name)
    return [p for f in entry.files if (p := _file_problem(entry, f, d / f.name)) is not None]


class Removed(NamedTuple):
    """What `remove` deleted: the model's files, its cached bundles, and the bytes freed by both."""

    files: list[Path]
    bundles: list[Path]
    freed: int


def remove(name: str, *, bundles: bool = True) -> Removed:
    """Delete model ``name`` from the cache: its registry's files (its folder too once empty) and, with ``bundles``, the
    ONNX bundles exported from it, int8 calibrations and TensorRT engines in them included (`cached_bundles`).

    Only files this cache made are deleted: a file of another name in the model's folder keeps the folder, and a
    symbolic link (a file's, or the model folder's itself) is unlinked, not followed. Nothing installed: an empty `Removed`. Install it again to use it
    (`reinstall_text`); bundles are exported again on first use.
    """
    entry, d = get_entry(name), model_dir(name)
    files, freed = [], 0
    if d.is_symlink():  # a linked copy (shared, on another disk) is not this cache's to empty: the link goes, its target stays
        d.unlink()
        files.append(d)
    for f in entry.files if not files else ():
        path = d / f.name
        if path.is_dir() and not path.is_symlink():
            raise ZooError(f"{path}: a folder where a model file goes; move it away, then remove {entry.name} again")
        try:
            size = 0 if path.is_symlink() else path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ZooError(f"cannot delete {path} ({exc.strerror or exc}); nothing else of {entry.name} was deleted after it") from exc
        files.append(path)
        freed += size
    if d.is_dir():
        _clean_stale_partials(d)  # temp files of dead installs; a live install's keep the folder
        with contextlib.suppress(OSError):
            d.rmdir()
    gone = []
    for b in cached_bundles(entry.name) if bundles else ():
        size = 0 if b.is_symlink() else sum(p.stat().st_size for p in b.rglob("*") if p.is_file() and not p.is_symlink())
        try:
            b.unlink() if b.is_symlink() else shutil.rmtree(b)  # a link: unlinked, not followed
        except OSError as exc:
            raise ZooError(f"cannot delete the cached bundle {b} ({exc.strerror or exc}); its model's files are deleted") from exc
        gone.append(b)
        freed += size
    return Removed(files, gone, freed)


# ---------------------------------------------------------------- install folder


def _unlink(path: Path) -> None:
    if path.is_dir():  # not ours to delete
        raise ZooError(f"{path}: a folder where a model file goes; move it away, then install again")
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


@contextlib.contextmanager
def _prepared_dir(d: Path) -> Iterator[None]:
    """`_prepare_dir`, and the folder removed again where the install fails before any file is in it (a failed first
    fetch left an empty model folder behind)."""
    existed = d.exists()
    _prepare_dir(d)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                d.rmdir()  # only while empty
        raise


def _clean_stale_partials(d: Path) -> None:
    # SIGKILL or power loss can skip our cleanup; don't let those pile up.
    sweep_stale(d)
    # Temp names of older ultrastyle versions carry no pid: judged by age instead.
    now = time.time()
    for p in d.glob(".*.partial-*"):
        try:
            if now - p.stat().st_mtime > _STALE_PARTIAL_S:
                p.unlink()
        except OSError:
            pass


def _needs_install(entry: ZooEntry, f: ZooFile, dest: Path, force: bool) -> bool:
    """Whether ``dest`` must be (re)written: missing, corrupt, or ``force`` (a good file is kept until its replacement is verified)."""
    if not dest.exists():
        return True
    return force or _file_problem(entry, f, dest) is not None


def _drop_corrupt(entry: ZooEntry, d: Path, todo: list[ZooFile]) -> None:
    """Remove the corrupt files among ``todo`` once their install is sure to start (its source checked): a failed install
    never leaves one behind looking installed."""
    for f in todo:
        if (d / f.name).exists() and _file_problem(entry, f, d / f.name) is not None:
            _unlink(d / f.name)


def _damaged_present(name: str) -> bool:
    """Whether an installed file of ``name`` is neither this release's nor an earlier one's: damaged, not outdated."""
    entry, d = get_entry(name), model_dir(name)
    for f in entry.files:
        path = d / f.name
        if path.is_dir():
            return True
        if path.is_file() and (found := sha256_file_cached(path)) != f.sha256 and found not in f.earlier_sha256:
            return True
    return False


# ---------------------------------------------------------------- download


def _mirror_url(mirror: str, entry: ZooEntry, f: ZooFile) -> str:
    return f"{mirror.rstrip('/')}/{urllib.parse.quote(entry.name)}/{urllib.parse.quote(f.name)}"


def check_mirror(mirror: str, name: str | None = None, *, given_as: str = "mirror") -> str:
    """``mirror`` if it is an http(s) base URL; else `ZooError` (a local folder is imported, not fetched).

    ``name``: the model it is for (named in the remedy); ``given_as``: where the value came from, for the message.
    """
    if not isinstance(mirror, str):  # a Path is a folder: what it holds is imported, not fetched
        mirror = os.fspath(mirror) if isinstance(mirror, os.PathLike) else mirror
    try:
        scheme = _scheme(mirror)
        host = urllib.parse.urlsplit(mirror).hostname
    except (ValueError, AttributeError, TypeError) as exc:
        raise ZooError(f"{given_as} {mirror!r}: not a URL ({exc}); expected an http:// or https:// base URL, e.g. https://host/models") from None
    if scheme in ("http", "https") and not host:
        raise ZooError(f"{given_as} {mirror!r}: no host; expected an http:// or https:// base URL, e.g. https://host/models")
    if scheme not in ("http", "https"):
        folder = mirror if not scheme and Path(mirror).is_dir() else Placeholder("DIR")  # a folder given: the one to import from
        fix = Remedy("import_model", (name if name else Placeholder("NAME"), folder))
        raise remedied(ZooError(f"{given_as} {mirror!r}: expected an http:// or https:// base URL (files are read from URL/NAME/FILE), "
                                f"got scheme {scheme or '(none)'!r}; a local copy of the files is installed with {fix.python()}"), fix)  # fmt: skip
    return mirror


def _scheme(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme.lower()


def _check_url(url: str, model: str) -> None:
    scheme = _scheme(url)
    if scheme not in ("http", "https"):
        raise DownloadError(url, f"unsupported URL scheme {scheme or '(none)'!r}, expected http:// or https://", model=model)


class _Progress:
    """A rich progress bar on stderr (bytes, speed) where stderr is a terminal, one plain line per file elsewhere (a log,
    a service's pipe: rich would print the bar's states there), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        self._lines = False
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)  # stdout stays clean for `models path` & co.
        if not console.is_terminal:
            self._lines = True
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )  # fmt: skip

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: int, verb: str = "downloading") -> Callable[[int], None]:
        if self._lines:
            size = f"{total / 1e6:.1f} MB" if total >= 10**5 else f"{total / 1e3:.0f} kB"  # not "0.0 MB"
            sys.stderr.write(f"{verb} {description} ({size})\n")
        if self._bar is None:
            return lambda n: None
        bar = self._bar
        tid = bar.add_task(description, total=total)
        return lambda n: bar.advance(tid, n)


def _download(entry: ZooEntry, f: ZooFile, url: str, dest: Path, timeout: float, advance: Callable[[int], None],
              mirror: str | None = None) -> None:  # fmt: skip
    """Stream ``url`` into ``dest`` atomically, checking size and sha256; ``mirror``: the base it comes from, for the errors."""

    def failed(cause: str) -> DownloadError:
        return DownloadError(url, cause, model=entry.name, mirror=mirror)

    _check_url(url, entry.name)
    req = urllib.request.Request(url, headers={"User-Agent": "ultrastyle-model-zoo"})
    with atomic_write(dest) as fh:
        h = hashlib.sha256()
        got = 0
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                announced = resp.headers.get("Content-Length")
                announced_n = int(announced) if announced and announced.isdigit() else None
                while True:
                    # Read at most one byte past the expected size: enough to tell
                    # a too-long file, never enough to fill the disk.
                    chunk = resp.read1(min(CHUNK, f.bytes + 1 - got))  # what has arrived: the bar and the count stay true
                    if not chunk:
                        break
                    fh.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    advance(len(chunk))
                    if got > f.bytes:
                        break
        except urllib.error.HTTPError as exc:
            raise failed(f"HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise failed(f"{exc.reason}") from exc
        except TimeoutError as exc:
            raise failed(f"timed out after {timeout:g} s (received {got} of {f.bytes} bytes)") from exc
        except OSError as exc:  # connection reset, http.client.IncompleteRead, ...
            raise failed(f"{type(exc).__name__}: {exc} (received {got} of {f.bytes} bytes)") from exc
        except ValueError as exc:  # http.client raises e.g. for a malformed chunked body
            raise failed(f"bad response: {exc}") from exc

        # http.client returns b"" instead of raising when a connection drops
        # before Content-Length bytes arrived, so compare counts ourselves.
        digest = h.hexdigest()
        if got < f.bytes and (announced_n is None or got < announced_n):
            total = announced_n if announced_n is not None else f.bytes
            raise failed(f"connection closed after {got} of {total} bytes")
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
    remember(dest, f.sha256)


def _copy_verified(entry: ZooEntry, f: ZooFile, src: Path, dest: Path, *, detail: str, hint: str = "", remedy: Remedies = None,
                   advance: Callable[[int], None] = lambda n: None) -> None:
    """Copy ``src`` to ``dest`` through a temp file, renamed into place only if its sha256 is ``f``'s."""
    with atomic_write(dest) as fh:  # renamed into place only if the block does not raise
        h = hashlib.sha256()
        try:
            with open(src, "rb") as s:
                for chunk in iter(lambda: s.read(CHUNK), b""):
                    try:
                        fh.write(chunk)
                    except OSError as exc:  # the cache's disk, not the source (a full disk said "cannot read" the source)
                        room = "free space there, or " if disk_full(exc) else ""
                        raise ZooError(f"cannot write {dest} ({exc.strerror or exc}) to install {entry.name}/{f.name}; "
                                       f"{room}set ULTRASTYLE_HOME to a folder on another disk") from exc  # fmt: skip
                    h.update(chunk)
                    advance(len(chunk))
        except OSError as exc:
            raise ZooError(f"cannot read {src} ({exc.strerror or exc}) to install {entry.name}/{f.name}") from exc
        digest = h.hexdigest()
        if digest != f.sha256:
            raise ChecksumError(f"{entry.name}/{f.name}", f.sha256, digest, detail=detail, hint=hint, remedy=remedy)
    remember(dest, f.sha256)


def _install_local(entry: ZooEntry, f: ZooFile, dest: Path, advance: Callable[[int], None] = lambda n: None) -> None:
    """Install a ``"package"`` or ``"from"`` file (its source model must be installed already)."""
    if f.package is not None:
        src = _WEIGHTS / f.package
        if not src.is_file():
            raise ZooError(
                f"{entry.name}/{f.name} ships inside the ultrastyle package at {src}, which is missing; "
                "reinstall ultrastyle (a wheel or checkout without its package data lacks it)"
            )
        _copy_verified(
            entry, f, src, dest, detail=f"packaged file {src}", advance=advance,
            hint="The installed ultrastyle package is damaged or was modified; reinstall it.",
        )  # fmt: skip
        return
    other, name = f.source_model, f.source_file
    assert other is not None and name is not None
    src = model_dir(other) / name
    if not src.is_file():
        raise remedied(ZooError(
            f"{entry.name}/{f.name} is a copy of {other}/{name}, which is missing at {src}; install it: {reinstall_text(other)}"
        ), reinstall(other))
    _copy_verified(
        entry, f, src, dest, detail=f"copied from {other}/{name} at {src}", advance=advance,
        hint=f"The installed {other} is damaged; reinstall it: {reinstall_text(other)}", remedy=reinstall(other),
    )  # fmt: skip


def fetch(
    name: str,
    *,
    mirror: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Install model ``name`` into :func:`model_dir` and return that directory.

    URL files are downloaded; packaged files are copied from the package and
    derived (``"from"``) files from their source model, which is installed
    first (with this ``mirror``, ``progress`` and ``timeout``; not forced).
    Files already present and verified are skipped (``force=True`` installs
    them again, replacing each only once its new copy is verified). ``mirror``
    (default ``$ULTRASTYLE_MIRROR``) replaces each pinned URL by
    ``{mirror}/{name}/{file}``. ``timeout`` is per connect / read, in seconds.
    Stops at the first failure with :class:`DownloadError`,
    :class:`ChecksumError` or :class:`ZooError`; files verified before it stay
    installed, and nothing of the failing file is left.
    """
    entry = get_entry(name)
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):  # a server is not to blame for these
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    given_as = "mirror"
    if mirror is None:
        mirror, given_as = os.environ.get("ULTRASTYLE_MIRROR") or None, "ULTRASTYLE_MIRROR"
    d = model_dir(name)
    todo = [f for f in entry.files if _needs_install(entry, f, d / f.name, force)]
    if mirror is not None and any(f.kind == "url" for f in todo):
        check_mirror(mirror, entry.name, given_as=given_as)  # only where it is used; before any folder, deletion or progress bar
    _drop_corrupt(entry, d, todo)
    # Source models first, each with its own progress bar (rich allows one live display at a time), before this
    # model's folder is made: it stays empty no longer than its own files take.
    for other in dict.fromkeys(f.source_model for f in todo if f.source_model):
        if not is_installed(other):
            fetch(other, mirror=mirror, progress=progress, timeout=timeout)
    with _prepared_dir(d):
        with _Progress(progress and bool(todo)) as bar:
            for f in todo:
                d.mkdir(exist_ok=True)  # another install into this cache may have failed and removed it, empty, meanwhile
                # A packaged file or a source model's copy is installed, not downloaded (an offline machine should not worry).
                advance = bar.task(f"{entry.name}/{f.name}", f.bytes, "downloading" if f.kind == "url" else "installing")
                if f.kind == "url":
                    assert f.url is not None
                    url = _mirror_url(mirror, entry, f) if mirror else f.url
                    _download(entry, f, url, d / f.name, timeout, advance, mirror)
                else:
                    _install_local(entry, f, d / f.name, advance)
    return d


# ---------------------------------------------------------------- local import


def _find_source(entry: ZooEntry, src: Path, files: list[ZooFile]) -> dict[str, Path]:
    """Map each of ``files`` to its path under ``src`` (flat, or in ``src/NAME/``)."""
    if not src.is_dir():
        raise SourceFolderError(f"{src} is not a directory; pass the folder that holds {files[0].name} etc.")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for f in files:
        for cand in (src / f.name, src / entry.name / f.name):
            if cand.is_file():
                found[f.name] = cand
                break
        else:
            missing.append(f.name)
    if missing:
        raise ZooError(
            f"{src} lacks {len(missing)} of the {len(files)} files of {entry.name}: {', '.join(missing)} "
            f"(looked in {src} and {src / entry.name}); copy all of them there and retry"
        )
    return found


def _check_sources(entry: ZooEntry, sources: dict[str, Path], todo: list[ZooFile]) -> None:
    """The sources of the files in ``todo`` hashed first: a `ChecksumError` naming all that do not match, before any is installed."""
    bad: list[tuple[ZooFile, str]] = []
    for f in todo:
        if f.name in sources and (found := sha256_file(sources[f.name])) != f.sha256:
            bad.append((f, found))
    if bad:
        f, found = bad[0]
        also = f"; {', '.join(str(sources[g.name]) for g, _ in bad[1:])} do not match either" if len(bad) > 1 else ""
        raise ChecksumError(f"{entry.name}/{f.name}", f.sha256, found, detail=f"source {sources[f.name]}{also}; nothing was installed",
                            hint="Copy the files again from a trusted source.")  # fmt: skip


def import_local(name: str, src: str | Path | None = None, *, force: bool = False) -> Path:
    """Install model ``name`` from local copies in ``src`` and return its directory.

    For offline machines. ``src`` holds the URL files flat (``1SE.pth`` ...) or
    in ``src/NAME/``. Every copy that would be installed is hashed first: one
    that does not match raises :class:`ChecksumError` (naming it, expected and
    found sha256, and any other bad copy) and none is installed. Each file is
    then copied to a temp file, hashed on the way, and renamed into place only
    if its sha256 matches. Packaged files are installed from the
    package and derived files from their source model; a source model that is
    not installed is imported from ``src`` first (never downloaded). ``src``
    may be None for a model without URL files. Files already installed and
    verified are skipped unless ``force``.
    """
    entry = get_entry(name)
    url_files = [f for f in entry.files if f.kind == "url"]
    if url_files and src is None:
        raise ZooError(f"{name} has {len(url_files)} file(s) to import ({url_files[0].name} ...); pass the folder that holds them")
    if src is not None and not Path(src).expanduser().is_dir():  # even where unneeded: a mistyped folder is said, not ignored
        raise SourceFolderError(f"{src} is not a directory; pass the folder that holds {name}'s files")
    needs_src = bool(url_files) or any(not is_installed(other) for other in entry.depends_on)
    src = Path(src).expanduser() if src is not None and needs_src else None  # packaged files, or derived from what is here: no folder
    sources = _find_source(entry, src, url_files) if url_files and src is not None else {}
    for other in entry.depends_on:
        if is_installed(other):
            continue
        if src is None:
            raise remedied(ZooError(f"{name} reuses files of {other}, which is not installed; install it first: {reinstall_text(other)}"),
                           reinstall(other))
        try:
            import_local(other, src)
        except ZooError as exc:
            raise remedied(ZooError(
                f"{name} reuses files of {other}, which is not installed and could not be imported from {src} "
                f"({exc}); install {other} first: {reinstall_text(other)}"
            ), reinstall(other)) from exc
    d = model_dir(name)

    def is_own_source(f: ZooFile) -> bool:  # importing the cache into itself: _drop_corrupt would delete a corrupt source
        return f.name in sources and (d / f.name).exists() and sources[f.name].resolve() == (d / f.name).resolve()

    todo = [f for f in entry.files if not is_own_source(f) and _needs_install(entry, f, d / f.name, force)]
    _check_sources(entry, sources, todo)
    _drop_corrupt(entry, d, todo)
    with _prepared_dir(d):
        for f in todo:
            d.mkdir(exist_ok=True)  # another install into this cache may have failed and removed it, empty, meanwhile
            dest = d / f.name
            if f.kind == "url":
                _copy_verified(
                    entry, f, sources[f.name], dest, detail=f"source {sources[f.name]}",
                    hint="Copy the file again from a trusted source.",
                )  # fmt: skip
            else:
                _install_local(entry, f, dest)
    problems = verify(name)
    if problems:  # e.g. the cache dir was modified concurrently
        raise ZooError(f"{name} failed verification after import: {'; '.join(problems)}")
    return d


def ensure(name: str, *, mirror: str | None = None, progress: bool = True) -> Path:
    """The directory of model ``name``, installing it first (:func:`fetch`) if any file is missing or outdated.

    Outdated: an earlier release's version of the file (:func:`is_outdated`),
    left by an older ultrastyle; it is replaced like a missing one. Every
    file's sha256 is then checked (:func:`check_installed`; about 10 ms per
    10 MB, once per process): a damaged installed file raises
    :class:`DamagedModelError` rather than being used. Packaged files need no
    network; derived files install their source model first.
    """
    if _damaged_present(name):
        return check_installed(name)  # a damaged file is refused, naming it, not replaced without a word (fetch would)
    outdated = is_outdated(name)
    if outdated or not is_installed(name):
        fetch(name, mirror=mirror, progress=progress)
    return check_installed(name)
