"""Model registry: ``zoo.json``, the models the zoo knows, loaded and validated.

The registry (``zoo.json``, shipped with the package next to this module) names
every model and pins each of its files' byte size and sha256 and where it
comes from. :func:`entries` and :func:`get_entry` return it as immutable
:class:`ZooEntry` / :class:`ZooFile` values. Installing those files is
`ultrastyle.models.zoo`'s business (it re-exports this module's public names);
this module knows nothing of the cache and never touches the network.

Every file has exactly one source (a file with none, or two, is a registry
error naming the model and file):

- ``"url"``: downloaded over HTTP(S)::

      {"name": "4SE.pth", "url": "https://github.com/.../20191110-132643_E20.pth",
       "sha256": "d2f059cb...", "bytes": 1235183}

- ``"package"``: this project's own weights, shipped inside the package under
  ``ultrastyle/models/weights/`` (path relative to that folder, by convention
  ``MODEL/FILE``); installed by a local copy, no network::

      {"name": "4SD.pth", "package": "ultrastyle-adain-16x/4SD.pth",
       "sha256": "...", "bytes": 881308}

- ``"from"``: the same bytes as file ``FILE`` of another registered model
  ``MODEL`` (``"MODEL/FILE"``); that model is installed first (downloaded if
  needed, with its own progress bar and errors), then the file is copied. Its
  sha256 and bytes must equal the other entry's::

      {"name": "4SE.pth", "from": "cd-wct-16x/4SE.pth",
       "sha256": "d2f059cb...", "bytes": 1235183}

An entry may also give ``"stages"`` (default ``[1, 2, 3, 4, 5]``: format
``cd`` entries must list ``{k}SE.pth`` and ``{k}SD.pth`` of each) and
``"defaults"`` (``{"method": "adain", "levels": [4], "alpha": 1.0}``, each key
optional; see `ultrastyle.models.defaults`), which become
:attr:`ZooEntry.stages` and :attr:`ZooEntry.defaults`.

Loading (once per process, cached) checks the whole file and raises
:class:`ZooError` naming the model and file and what to fix: file and model
names are plain names (no folders); ``sha256`` is 64 hex digits and ``bytes``
a non-negative integer; an optional ``"earlier_sha256"`` lists the file's
digests in earlier releases (an installed copy with one of them is replaced
by ``zoo.ensure``, not refused as damaged); a ``"package"`` path stays inside the weights folder;
a ``"from"`` names an existing file of another model with the same sha256 and
bytes, and models do not reuse each other's files in a cycle; no file is
listed twice; ``stages`` are distinct stages 1..5; formats ``cd`` and
``pytorch-adain`` (stage 4 only) list the files their loader needs. An
unreadable or malformed ``zoo.json`` is a :class:`ZooError` too.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ultrastyle.core.arch import STAGES
from ultrastyle.errors import Remedy
from ultrastyle.models.defaults import ModelDefaults, defaults_from_dict
from ultrastyle.models.errors import ZooError

__all__ = [
    "ZooError",
    "UnknownModelError",
    "ZooFile",
    "ZooEntry",
    "SOURCE_KINDS",
    "entries",
    "get_entry",
]

_REGISTRY = Path(__file__).with_name("zoo.json")
SOURCE_KINDS = ("url", "package", "from")


class UnknownModelError(ZooError):
    """A model name that the registry does not know."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        if "/" in name or "\\" in name or name.startswith((".", "~")):  # meant as a folder
            if Path(name).expanduser().exists():  # where only a zoo model goes (`models fetch`, `verify`, ...)
                super().__init__(f"{name}: a path, where a zoo model's name goes; known models are {', '.join(known) or '(none)'}")
            else:
                super().__init__(f"{name}: no such model folder (nor a model name: known models are {', '.join(known) or '(none)'})")
            return
        self.remedy = Remedy("list_models")
        lower = {k.lower(): k for k in known}  # names are lower case: CD-WCT-16X is no typo
        close = [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.75)]
        guess = f"did you mean {close[0]!r}? " if close else ""
        super().__init__(f"unknown model {name!r}; {guess}known models: {', '.join(known) or '(none)'} (described by {self.remedy.python()})")


@dataclass(frozen=True)
class ZooFile:
    """One file of a model: installed as ``zoo.model_dir(entry)/name``.

    Exactly one of ``url`` (downloaded), ``package`` (a path under
    ``zoo.weights_dir()``) and ``derived_from`` (``"MODEL/FILE"``, a file of
    another registered model; ``"from"`` in zoo.json) is set.
    """

    name: str
    url: str | None
    sha256: str
    bytes: int
    package: str | None = None
    derived_from: str | None = None
    # This file's sha256 in earlier ultrastyle releases ("earlier_sha256" in
    # zoo.json): an installed copy with one of them is outdated, not damaged,
    # and `zoo.ensure` replaces it.
    earlier_sha256: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``"url"``, ``"package"`` or ``"from"``."""
        if self.package is not None:
            return "package"
        if self.derived_from is not None:
            return "from"
        return "url"

    @property
    def source_model(self) -> str | None:
        """The model a ``"from"`` file is copied from, else None."""
        return self.derived_from.split("/", 1)[0] if self.derived_from else None

    @property
    def source_file(self) -> str | None:
        """The file name within :attr:`source_model`, else None."""
        return self.derived_from.split("/", 1)[1] if self.derived_from else None


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
    stages: tuple[int, ...] = STAGES
    # Resolved at registry load (zoo.json's "defaults", missing keys filled in);
    # None only for entries built by hand: see `ultrastyle.models.sources.model_defaults`.
    defaults: ModelDefaults | None = None

    @property
    def total_bytes(self) -> int:
        """Sum of the file sizes."""
        return sum(f.bytes for f in self.files)

    @property
    def source_kinds(self) -> tuple[str, ...]:
        """The distinct source kinds of the files, in :data:`SOURCE_KINDS` order."""
        kinds = {f.kind for f in self.files}
        return tuple(k for k in SOURCE_KINDS if k in kinds)

    @property
    def depends_on(self) -> tuple[str, ...]:
        """Models whose files this one reuses (``"from"`` sources), in file order."""
        return tuple(dict.fromkeys(f.source_model for f in self.files if f.source_model))


# ---------------------------------------------------------------- loading

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Files the loader needs, per format (other formats, e.g. "cd-base", are not checked).
_ADAIN_FILES = ("vgg_normalised.pth", "decoder.pth")


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _parse_file(model: str, f: dict) -> ZooFile:
    where = f"{_REGISTRY}: model {model!r}, file {f.get('name')!r}"
    if not _plain_name(f.get("name")):
        raise ZooError(f"{where}: a file name must be a plain file name (no folders)")
    given = [k for k in SOURCE_KINDS if f.get(k) is not None]
    if len(given) != 1:
        found = "no source" if not given else f"{len(given)} sources ({', '.join(given)})"
        raise ZooError(f"{where}: has {found}; give exactly one of \"url\", \"package\" or \"from\"")
    sha = str(f["sha256"]).lower()
    if not _SHA256.match(sha):
        raise ZooError(f"{where}: sha256 must be 64 hex digits, got {f['sha256']!r}")
    earlier = f.get("earlier_sha256", [])
    if not isinstance(earlier, list) or not all(isinstance(e, str) and _SHA256.match(e.lower()) for e in earlier):
        raise ZooError(f"{where}: earlier_sha256 must be a list of sha256 digests (64 hex digits each), got {earlier!r}")
    earlier = [e.lower() for e in earlier]
    if sha in earlier:
        raise ZooError(f"{where}: earlier_sha256 lists the current sha256 {sha}; an earlier version must differ from it")
    size = f["bytes"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ZooError(f"{where}: bytes must be a non-negative integer, got {size!r}")
    package = derived = None
    if "package" in given:
        package = f["package"]
        pp = PurePosixPath(package) if isinstance(package, str) else None
        if pp is None or pp.is_absolute() or not pp.parts or ".." in pp.parts or "\\" in package:
            raise ZooError(
                f"{where}: \"package\" must be a relative path inside ultrastyle/models/weights/ "
                f"(e.g. \"{model}/{f['name']}\"), got {package!r}"
            )
    if "from" in given:
        derived = f["from"]
        parts = derived.split("/") if isinstance(derived, str) else []
        if len(parts) != 2 or not all(_plain_name(p) for p in parts):
            raise ZooError(f"{where}: \"from\" must be \"MODEL/FILE\" (a file of another registered model), got {derived!r}")
    url = f["url"] if "url" in given else None
    if url is not None and not isinstance(url, str):
        raise ZooError(f"{where}: \"url\" must be a string, got {url!r}")
    return ZooFile(name=f["name"], url=url, sha256=sha, bytes=size, package=package, derived_from=derived,
                   earlier_sha256=tuple(earlier))  # fmt: skip


def _parse_stages(model: str, e: dict) -> tuple[int, ...]:
    raw = e.get("stages", list(STAGES))
    ok = (
        isinstance(raw, list) and raw
        and all(isinstance(k, int) and not isinstance(k, bool) and k in STAGES for k in raw)
        and len(set(raw)) == len(raw)
    )  # fmt: skip
    if not ok:
        raise ZooError(f"{_REGISTRY}: model {model!r}: \"stages\" must be a non-empty list of distinct stages 1..5, got {raw!r}")
    return tuple(sorted(raw))


def _check_entry_files(entry: ZooEntry) -> None:
    names = [f.name for f in entry.files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ZooError(f"{_REGISTRY}: model {entry.name!r} lists {', '.join(dup)} more than once")
    if entry.format == "cd":
        needed = [f"{k}{part}.pth" for k in entry.stages for part in ("SE", "SD")]
    elif entry.format == "pytorch-adain":
        if entry.stages != (4,):
            raise ZooError(f"{_REGISTRY}: model {entry.name!r}: format pytorch-adain has stage 4 only; set \"stages\": [4]")
        needed = list(_ADAIN_FILES)
    else:
        return
    missing = [n for n in needed if n not in names]
    if missing:
        raise ZooError(
            f"{_REGISTRY}: model {entry.name!r} (format {entry.format}, stages {list(entry.stages)}) "
            f"lacks the file(s) {', '.join(missing)}"
        )


def _check_derived(reg: dict[str, ZooEntry]) -> None:
    """Every ``"from"`` names an existing file of another model, with the same bytes; no cycles."""
    for entry in reg.values():
        for f in entry.files:
            if f.derived_from is None:
                continue
            where = f"{_REGISTRY}: model {entry.name!r}, file {f.name!r}: \"from\" {f.derived_from!r}"
            other = reg.get(f.source_model or "")
            if other is None or other.name == entry.name:
                raise ZooError(f"{where} must name another registered model (known: {', '.join(sorted(reg))})")
            src = next((g for g in other.files if g.name == f.source_file), None)
            if src is None:
                raise ZooError(f"{where}: {other.name} has no file {f.source_file!r} ({', '.join(g.name for g in other.files)})")
            if (src.sha256, src.bytes) != (f.sha256, f.bytes):
                raise ZooError(
                    f"{where}: sha256/bytes {f.sha256}/{f.bytes} differ from {f.derived_from}'s {src.sha256}/{src.bytes}; "
                    "a derived file must be byte-identical to its source"
                )
    # Model-level cycles would make ensure() recurse forever.
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise ZooError(f"{_REGISTRY}: models reuse each other's files in a cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for dep in reg[name].depends_on:
            visit(dep, path + [name])
        state[name] = 2

    for name in reg:
        visit(name, [])


@functools.lru_cache(maxsize=1)
def _load_registry() -> dict[str, ZooEntry]:
    try:
        data = json.loads(_REGISTRY.read_text(encoding="utf-8"))
        out: dict[str, ZooEntry] = {}
        for name, e in data["models"].items():
            if not _plain_name(name):
                raise ZooError(f"{_REGISTRY}: model name {name!r} must be a plain name (no folders)")
            files = tuple(_parse_file(name, f) for f in e["files"])
            stages = _parse_stages(name, e)
            entry = ZooEntry(
                name=name,
                description=e["description"],
                license=e["license"],
                source=e["source"],
                architecture=e["architecture"],
                format=e["format"],
                files=files,
                stages=stages,
                defaults=defaults_from_dict(
                    e.get("defaults") or {}, stages, where=f"{_REGISTRY} (model {name!r})",
                    base="pytorch-adain" if e["format"] == "pytorch-adain" else None,
                ),
            )
            _check_entry_files(entry)
            out[name] = entry
        _check_derived(out)
        return out
    except ZooError:
        raise  # already names the entry and what to fix
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ZooError(
            f"the model registry {_REGISTRY} is unreadable ({type(exc).__name__}: {exc}); reinstall ultrastyle"
        ) from exc


def entries() -> dict[str, ZooEntry]:
    """All registry entries by name (a fresh dict; entries are immutable)."""
    return dict(_load_registry())


def is_zoo_name(source: object) -> bool:
    """Whether ``source`` is a ``str`` naming a registry model: the zoo's, sha256-verified, even where a folder of that
    name lies in the working directory (``./NAME`` or a `Path` gives such a folder)."""
    return isinstance(source, str) and source in _load_registry()


def get_entry(name: str) -> ZooEntry:
    """The entry called ``name``; :class:`UnknownModelError` lists the known names."""
    reg = _load_registry()
    try:
        return reg[name]
    except KeyError:
        raise UnknownModelError(name, sorted(reg)) from None
