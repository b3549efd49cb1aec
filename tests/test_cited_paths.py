"""Every repository file that the code, the tests or the docs cite exists.

Docstrings and comments name the test that checks a claim, the doc that
explains it, the benchmark that measured it: a cited file that was renamed
or never committed sends a reader nowhere. This test finds every
such citation (a path under ``ultrastyle/``, ``tests/``, ``docs/`` or
``benchmarks/`` ending in a source or document suffix) in the package, the
tests, the benchmarks, the docs and the README, and checks the file is in
the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("ultrastyle", "tests", "benchmarks", "docs")
SUFFIXES = {".py", ".md", ".json", ".sh", ".js", ".toml", ".txt", ".cfg"}
# A cited path: one of the repository's top folders, then path characters, then a suffix.
CITATION = re.compile(r"(?<![\w./-])((?:ultrastyle|tests|docs|benchmarks)/[\w./-]*?\.(?:py|md|json|sh|js|toml))(?![\w/])")
# Paths with the same shape that name another project's file, and the project named with them
# (on the citing line or the one before).
UPSTREAM = {"docs/operators.md": "onnx-tensorrt"}


def _sources() -> list[Path]:
    files = [REPO / "README.md"]
    for top in SCANNED:
        files += [p for p in sorted((REPO / top).rglob("*")) if p.is_file() and p.suffix in SUFFIXES]
    return [p for p in files if "__pycache__" not in p.parts and p.is_file()]


def _placeholder(path: str) -> bool:
    """``benchmarks/NAME.py``: a pattern in prose, not a file."""
    return Path(path).stem.isupper()


def cited_paths() -> list[tuple[Path, int, str, str]]:
    """(citing file, line number, cited path, that line and the one before) of every citation."""
    out = []
    for src in _sources():
        lines = src.read_text(encoding="utf-8", errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            context = (lines[n - 2] + "\n" if n > 1 else "") + line
            out += [(src, n, m.group(1), context) for m in CITATION.finditer(line)]
    return out


def test_the_scan_finds_citations_in_code_tests_and_docs():
    found = {(src.relative_to(REPO).as_posix(), path) for src, _, path, _ in cited_paths()}
    assert ("ultrastyle/core/arch.py", "docs/design.md") in found  # a docstring
    assert any(src.startswith("tests/") for src, _ in found)
    assert any(src.startswith("docs/") for src, _ in found)
    assert CITATION.findall("checked by ``tests/test_tiling.py``; see docs/design.md.") == ["tests/test_tiling.py", "docs/design.md"]
    assert CITATION.findall("ultrastyle/models/zoo.json, not a/tests/x.py or tests/x.pyc") == ["ultrastyle/models/zoo.json"]


def test_every_cited_repository_file_exists():
    missing = []
    for src, n, path, context in cited_paths():
        if _placeholder(path) or (REPO / path).exists():
            continue
        if path in UPSTREAM and UPSTREAM[path] in context:
            continue  # another project's file, named with its project
        missing.append(f"{src.relative_to(REPO)}:{n}: {path}")
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)


def test_no_module_cites_the_design_note_outside_the_repository():
    # The design note lives in docs/design.md; a bare "DESIGN.md" pointed at a brief outside the repository.
    bad = [
        f"{p.relative_to(REPO)}:{n}"
        for p in sorted((REPO / "ultrastyle").rglob("*.py"))
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"(?<![\w/])DESIGN\.md", line)
    ]
    assert not bad, f"cite docs/design.md instead: {bad}"
