"""What a batch makes: content x style pairs, their outputs' names, and the results and summary of a run.

`plan_pairs` names every output before any work and refuses two pairs that would write one file or an output that
would replace an input; `BatchSummary` says what was done, skipped or failed (`runtime.batch` runs the pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ultrastyle.core.styles import mix_weights
from ultrastyle.errors import Remedies, Setting, remedied, warn
from ultrastyle.io.constants import OUTPUT_FORMATS
from ultrastyle.io.paths import ignores_case
from ultrastyle.io.sources import Source


@dataclass(frozen=True)
class StyleSpec:
    """The style side of one output: one image, a weighted mix, or one image per mask label.

    ``weights`` (a mix) are normalised to sum to 1. With ``mask``, label ``i``
    (the ``i``-th smallest colour of the mask, `io.masks.read_labels`) takes
    ``paths[i]``. Entries are paths or `ImageInput`.
    """

    paths: tuple[Source, ...]
    weights: tuple[float, ...] | None = None
    mask: Source | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("a style needs at least one image")
        if self.weights is not None:
            if self.mask is not None:
                raise ValueError("a style mix and a mask cannot be combined; give one style per mask label")
            if len(self.weights) != len(self.paths):
                raise ValueError(f"{len(self.paths)} styles but {len(self.weights)} weights: give one weight per style")
            object.__setattr__(self, "weights", mix_weights(self.weights))
        elif len(self.paths) > 1 and self.mask is None:
            raise ValueError("several styles make one output only as a weighted mix or with a mask")

    @property
    def name(self) -> str:
        """The part of output file names that names the style."""
        if self.weights is not None:
            return "+".join(f"{p.stem}@{w:.3g}" for p, w in zip(self.paths, self.weights))
        # The mask too: runs of one content and styles with other masks must not replace (or skip) each other's output.
        return "+".join(p.stem for p in self.paths) + (f"_mask-{self.mask.stem}" if self.mask is not None else "")

    def __str__(self) -> str:
        if self.weights is not None:
            return " + ".join(f"{p} x {w:.3g}" for p, w in zip(self.paths, self.weights))
        return " + ".join(map(str, self.paths)) + (f" (mask {self.mask})" if self.mask is not None else "")


@dataclass(frozen=True)
class Pair:
    content: Source
    style: StyleSpec
    output: Path | None  # None: kept in memory (`PairResult.image`)


@dataclass
class PairResult:
    pair: Pair
    status: str  # "done" | "skipped" | "failed"
    error: str | None = None
    seconds: float = 0.0  # compute time of this pair
    megapixels: float = 0.0
    image: np.ndarray | None = None  # (H, W, 3) uint8/uint16, for pairs without an output file
    remedy: Remedies = None  # the fix the failure's error suggests (`errors.Remedy`), for a front end to show its way
    option: str | None = None  # the setting the failure is about (an `OptionError`'s keyword), for a front end to name its way


def not_made_disk_full(pair: Pair, failed: Path, full: OSError) -> PairResult:
    """The result of a pair a batch does not compute once writing ``failed`` found its disk full (``full``): every later
    output would fail after all its work. One message for all of them, so a front end says it once."""
    rerun = Setting("skip_existing", True)
    return PairResult(pair, "failed", remedy=rerun, error=(
        f"not made: no room is left on the disk of {failed.parent} ({full.strerror or full}, writing {failed.name}); free space, "
        f"then run the batch again with {rerun.python()} to make the rest"))  # fmt: skip


# A batch's summary gives seconds per megapixel from this many megapixels done.
RATE_MIN_MEGAPIXELS = 1.0


@dataclass
class BatchSummary:
    results: list[PairResult] = field(default_factory=list)
    wall_seconds: float | None = None  # the whole batch, reading and writing included
    planned: int | None = None  # the pairs the batch was given (more than `results` after Ctrl-C); None: as many as results

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def megapixels(self) -> float:
        return sum(r.megapixels for r in self.results if r.status == "done")

    @property
    def seconds(self) -> float:
        """The batch's wall time (the sum of compute times where the wall is unknown)."""
        return self.wall_seconds if self.wall_seconds is not None else sum(r.seconds for r in self.results)

    @property
    def seconds_per_megapixel(self) -> float | None:
        """`seconds` per megapixel done."""
        mp = self.megapixels
        return self.seconds / mp if mp else None

    def describe(self, total: int | None = None) -> str:
        """``"3 done, 1 skipped, 0 failed of 4 pairs in 25.2 s (12.0 MP, 2.10 s/MP)"``.

        The rate only from `RATE_MIN_MEGAPIXELS` done: below it the fixed costs (opening the model, the styles'
        statistics) dominate, and 0.01 MP in 2 s would read as 200 s/MP.
        """
        of = total if total is not None else self.planned if self.planned is not None else len(self.results)
        text = f"{self.count('done')} done, {self.count('skipped')} skipped, {self.count('failed')} failed of {of} pairs"
        seconds = self.seconds
        if seconds:
            text += f" in {seconds:.1f} s"
        mp = self.megapixels
        if mp >= RATE_MIN_MEGAPIXELS:
            text += f" ({mp:.1f} MP, {seconds / mp:.2f} s/MP)"
        elif mp:
            text += f" ({mp:.2f} MP)"
        return text


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a batch: ``summary`` holds the pairs finished before it (outputs complete, none partial).

    ``abandoned``: the outputs being written were dropped (a Ray pool kills its busy actors), not finished.
    ``unfinished``: the pairs that were running, where the caller knows them (an optimization keeps their state).
    """

    def __init__(self, summary: BatchSummary, abandoned: bool = False, unfinished: tuple[Pair, ...] = ()) -> None:
        super().__init__("interrupted")
        self.summary, self.abandoned, self.unfinished = summary, abandoned, unfinished


T = TypeVar("T")


def deal(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The K-th of N parts of ``items``, dealt round-robin (items K, K+N, ... counting from 1): every part of one list is
    disjoint from the others, they cover it, and their sizes differ by at most one. None: every item.

    A batch deals its contents (so each is read by one part only); every machine given the same inputs deals them
    alike, since folders and globs expand in sorted order.
    """
    if shard is None:
        return list(items)
    k, n = shard
    return list(items[k - 1 :: n])


def shard_pairs(pairs: Sequence[Pair], shard: tuple[int, int] | None) -> list[Pair]:
    """The pairs of the K-th of N parts of a planned batch: its contents dealt (`deal`) in pair order, each with all its pairs.

    Dealt after planning (`plan_pairs` leaves out the batch's own outputs and refuses clashing names over the whole
    batch), so every part deals the same list whatever the other parts have written so far.
    """
    if shard is None:
        return list(pairs)
    mine = set(deal(list(dict.fromkeys(p.content for p in pairs)), shard))
    return [p for p in pairs if p.content in mine]


def output_name(content: Source, style: Source | StyleSpec, fmt: str) -> str:
    name = style.name if isinstance(style, StyleSpec) else style.stem
    return f"{content.stem}_stylized_{name}.{fmt}"


class OutputCollisionError(ValueError):
    """The outputs cannot be written as planned: two pairs would write one file, one would replace an input, or a name is
    longer than a file name may be."""


# The longest file name (bytes) of the usual file systems (ext4, XFS, APFS, NTFS in UTF-16 units): a longer output
# name would fail at its write, after the compute.
NAME_MAX = 255


class OutputsAsContentsWarning(UserWarning):
    """Contents that are outputs of the same batch (a rerun into the contents' folder) were left out."""


def too_long_name(output: Path) -> str | None:
    """What is wrong where an output writes a name longer than `NAME_MAX` bytes (a Deep Zoom output's ``NAME_files``
    and ``NAME.html`` too), else None."""
    names = [output.name]
    if output.suffix.lower() == ".dzi":
        names += [f"{output.stem}_files", f"{output.stem}.html"]
    longest = max(names, key=lambda n: len(n.encode()))
    size = len(longest.encode())
    return f"{longest[:40]}...{longest[-24:]} ({size} bytes), longer than a file name may be ({NAME_MAX})" if size > NAME_MAX else None


def plan_pairs(contents: Sequence[Source], styles: Sequence[Source | StyleSpec], outdir: Path, fmt: str) -> list[Pair]:
    """Every content x style pair, in content-major order; refuses pairs that share an output name or would replace a style.

    Contents that are outputs of this batch (an earlier run's, written into the contents' folder, in any format) are left
    out, as `optimization.batch.plan_outputs` does: a rerun there (``skip_existing`` after Ctrl-C, another format) does
    not stylize its outputs.
    """
    specs = [s if isinstance(s, StyleSpec) else StyleSpec((s,)) for s in styles]
    where = outdir.resolve()
    planned = {where / output_name(c, s, f) for c in contents for s in specs for f in OUTPUT_FORMATS}
    kept: list[Source] = []
    left: list[Source] = []
    for c in contents:
        (left if isinstance(c, Path) and c.resolve() in planned else kept).append(c)
    if left:
        warn(f"{len(left)} of the contents are outputs of this batch (an earlier run's, in the output folder), left "
                      f"out: {', '.join(map(str, left[:3]))}{', ...' if len(left) > 3 else ''}", OutputsAsContentsWarning)  # fmt: skip
    pairs = [Pair(c, s, outdir / output_name(c, s, fmt)) for c in kept for s in specs]
    # One file, two names: where the disk ignores case (macOS, Windows), Photo_x.png and photo_x.png collide.
    key = (lambda path: str(path).casefold()) if ignores_case(outdir) else (lambda path: str(path))
    inputs = {key(p.resolve()): p for spec in specs for p in (*spec.paths, spec.mask) if isinstance(p, Path)}
    seen: dict[str, Pair] = {}
    for p in pairs:
        assert p.output is not None
        if (long := too_long_name(p.output)) is not None:
            raise OutputCollisionError(f"{p.content} + {p.style} would write {long}; give the content or style a shorter name")
        if (replaced := inputs.get(key(where / p.output.name))) is not None:
            raise remedied(OutputCollisionError(
                f"{p.content} + {p.style} would write {p.output}, which is {replaced}, an input of this batch; write the "
                "outputs into another folder (output_dir)"
            ), Setting("output_dir"))
        if key(p.output) in seen:
            q = seen[key(p.output)]
            same = "" if q.output == p.output else f" (and {q.output.name}: one file on this disk, which ignores case)"
            raise remedied(OutputCollisionError(
                f"{q.content} + {q.style} and {p.content} + {p.style} would both write {p.output}{same}; "
                "rename one of the files or write them into different output folders (output_dir)"
            ), Setting("output_dir"))
        seen[key(p.output)] = p
    return pairs


__all__ = [
    "BatchInterrupted", "BatchSummary", "OutputCollisionError", "OutputsAsContentsWarning", "Pair", "PairResult", "RATE_MIN_MEGAPIXELS",
    "StyleSpec", "output_name", "plan_pairs", "too_long_name",
]  # fmt: skip
