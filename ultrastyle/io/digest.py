"""sha256 of files: what the zoo, bundles, int8 graphs and engines are checked by.

Torch-free. `sha256_file_cached` remembers a digest per process while the
file's inode, size, mtime and ctime stay put: the load path checks a model's
files and then keys its bundle by the same digests, and one hash per file per
process is enough.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20  # bytes read at a time

# path -> (stat key, sha256)
_DIGESTS: dict[Path, tuple[tuple[int, ...], str]] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file_cached(path: str | Path) -> str:
    """:func:`sha256_file`, remembered for this process while the file's inode, size, mtime and ctime stay put."""
    path = Path(path).absolute()
    key = _stat_key(path)
    hit = _DIGESTS.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    digest = sha256_file(path)
    _DIGESTS[path] = (key, digest)
    return digest


def remember(path: str | Path, digest: str) -> None:
    """Record the digest of a file just written (hashed while copied), for :func:`sha256_file_cached`."""
    path = Path(path).absolute()
    _DIGESTS[path] = (_stat_key(path), digest)


__all__ = ["CHUNK", "remember", "sha256_file", "sha256_file_cached"]
