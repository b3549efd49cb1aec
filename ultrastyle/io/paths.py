"""Expand CLI arguments (files, directories, globs) into image paths; a file's version."""

from __future__ import annotations

import functools
import glob
import os
import sys
from pathlib import Path

from ultrastyle.io.atomic import partial_path
from ultrastyle.io.constants import IMAGE_SUFFIXES


def expand_inputs(specs: list[str] | list[Path], unique: bool = True) -> list[Path]:
    """Files as given, directories as their image files (sorted, hidden ones left out), globs as their matches (sorted);
    ``~`` expanded.

    A path that exists nowhere is kept as it is, so the batch reports it as a
    bad input ("no such file") instead of silently dropping it. Duplicates (the
    same file, however written) are dropped, the first spelling and the order
    kept, unless ``unique`` is False (a mask's styles, one per label: one style
    may cover two labels).
    """
    out: list[Path] = []
    for spec in map(os.path.expanduser, map(str, specs)):  # ~ as a shell would (from Python, a quoted argument)
        p = Path(spec)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.is_file() and is_image_name(f.name))
        elif p.exists():
            out.append(p)
        elif glob.has_magic(spec):
            # A glob that matches nothing is reported like a missing file.
            out += sorted(Path(m) for m in glob.glob(spec) if Path(m).is_file()) or [p]
        else:
            out.append(p)
    if not unique:
        return out
    firsts: dict[str, Path] = {}
    for p in out:
        firsts.setdefault(input_key(p), p)
    return list(firsts.values())


def is_image_name(name: str) -> bool:
    """Whether a file found in a folder is taken for an image: an image suffix, and not hidden. macOS leaves ``._NAME``
    resource forks beside copied files (not images), and a glob leaves dot-files out too."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES  # "png" alone has no suffix


def input_key(path: str | os.PathLike) -> str:
    """One input however its path is written (relative, absolute, through linked folders or ``..``): its folder with links
    followed, and its own name (a link to a file is an input of its own name, which names its outputs)."""
    p = Path(path)
    return os.path.join(os.path.realpath(p.parent), p.name)


def file_signature(path: os.PathLike | str | None) -> tuple[int, int] | None:
    """(mtime ns, size) of a file, None when absent (or ``path`` None): whether it changed since it was read or written."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def ignores_case(folder: str | os.PathLike) -> bool:
    """Whether file names in ``folder`` (or its nearest existing parent) ignore case, as macOS's and Windows' disks do:
    there ``Photo_x.png`` and ``photo_x.png`` are one file. Found by making a file and asking for its upper-case name."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    name = str(partial_path(p / "case-probe"))  # a kill right now leaves a name the next sweep of the folder removes
    try:
        os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:  # not writable here: the platform's usual disks
        return os.name == "nt" or sys.platform == "darwin"
    try:
        return os.path.exists(os.path.join(p, os.path.basename(name).upper()))
    finally:
        os.unlink(name)

