"""Many contents, one style, by optimization: what `ultrastyle optimize` runs, as a library call.

`optimize_batch` (or `Optimizer` + `run_batch` for an open loss network)
names each output ``{content}_optimized_{style}.{format}`` in a folder (or
writes the one file given), skips outputs that exist when asked, saves and
resumes each image's state beside its output, and never stops at a bad
file: its pair is ``"failed"`` with the reason, the others run. Results are
`runtime.pairs.PairResult` s in a `BatchSummary`, as `stylize_batch` gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from typing_extensions import Unpack  # typing's own from Python 3.11

from ultrastyle import options as check
from ultrastyle.io.atomic import disk_full, sweep_stale
from ultrastyle.io.constants import IMAGE_SUFFIXES
from ultrastyle.io.images import ImageError, as_role, check_pixels
from ultrastyle.io.paths import expand_inputs, ignores_case
from ultrastyle.io.sources import image_header, resized_header
from ultrastyle.models.defaults import DEFAULT_MODEL
from ultrastyle.optimization.run import (
    _SETTINGS,
    CALL_KEYWORDS,
    FORMATS,
    OptimizeOptions,
    Optimizer,
    OptimizeSettings,
    ProgressEvent,
    foreign_state,
    make_optimize_options,
    read_input,
)
from ultrastyle.options import OptionError, known_keywords
from ultrastyle.runtime.batch import output_exists
from ultrastyle.runtime.pairs import NAME_MAX, BatchInterrupted, BatchSummary, Pair, PairResult, StyleSpec, deal, not_made_disk_full, too_long_name

__all__ = ["check_budget", "check_style", "is_file_output", "optimize_batch", "plan_outputs", "run_batch", "state_dir_for"]

PairProgress = Callable[[Pair, ProgressEvent], None]


def state_dir_for(output: Path) -> Path:
    """Where an output's optimization state is saved while it runs (beside it, hidden; removed once done).

    An output name within `NAME_MAX` bytes whose state name is not keeps its first bytes and a digest of the whole
    (the state failed to save, after the compute).
    """
    name = f".{output.name}.optimize-state"
    if len(name.encode()) > NAME_MAX:
        digest = hashlib.blake2b(output.name.encode(), digest_size=6).hexdigest()
        name = f".{output.name.encode()[:NAME_MAX - 40].decode(errors='ignore')}~{digest}.optimize-state"
    return output.with_name(name)


def is_file_output(output: str | os.PathLike) -> bool:
    """Whether ``output`` names one output file (an image suffix, not an existing folder) rather than a folder."""
    return Path(output).suffix.lower() in IMAGE_SUFFIXES and not Path(output).is_dir()


def plan_outputs(contents: str | os.PathLike | Sequence[str | os.PathLike], style: str | os.PathLike, output: str | os.PathLike,
                 fmt: str) -> list[Pair]:  # fmt: skip
    """One `Pair` per content image (folders and globs expanded): ``output`` a folder, or a file for one content.

    `OptionError` (``contents``, ``style``, ``output``) for inputs that cannot make a batch, before any work: among
    them an output that is one of the inputs, and two contents whose outputs would have one name.
    """
    if isinstance(contents, (str, os.PathLike)):  # one path, not a sequence of its characters
        contents = [contents]
    check.no_empty_path("contents", contents)
    check.no_empty_path("style", [style], "a style image file")
    check.no_empty_path("output", [output], "a folder, or a file name for one content")
    files = expand_inputs([os.fspath(c) for c in contents])
    if not files:
        raise OptionError("contents", f"no content images found in: {' '.join(map(os.fspath, contents))}")
    style = Path(style).expanduser()
    if not style.is_file():
        raise OptionError("style", f"{style}: {'a folder, not a style image file' if style.is_dir() else 'no such style image file'}")
    output = Path(output).expanduser()
    if output.suffix.lower() == ".dzi":
        raise OptionError("output", f"{output}: the optimizer writes one image (png, jpg or tiff), not a Deep Zoom folder")
    as_file = is_file_output(output)
    check.output_folder("output", output.parent if as_file else output)  # a file in the way fails here, not after the compute
    if as_file and len(files) > 1:  # a file name for several outputs would silently become a folder
        raise OptionError(
            "output", f"{output} looks like a file name, but {len(files)} contents were given; give a folder "
            "(files in it are named {content}_optimized_{style}.{format})",
        )  # fmt: skip
    spec = StyleSpec((style,))

    def out_of(f: Path, suffix: str = fmt) -> Path:
        return output if as_file else output / f"{f.stem}_optimized_{style.stem}.{suffix}"

    planned = {out_of(f, suffix).resolve() for f in files for suffix in FORMATS}
    # Earlier outputs in the contents' folder are not contents (a rerun into that folder, --skip-existing after Ctrl-C), in
    # any format: a rerun in another would optimize them.
    pairs = [Pair(f, spec, out_of(f)) for f in files if f.resolve() not in planned or out_of(f).resolve() == f.resolve()]
    # Photo_x.png and photo_x.png: one file where the disk ignores case (macOS, Windows)
    fold = (lambda q: Path(str(q).casefold())) if ignores_case(output.parent if as_file else output) else (lambda q: q)
    seen: dict[Path, Path] = {}
    for p in pairs:
        assert p.output is not None
        target = fold(p.output.resolve())
        if (long := too_long_name(p.output)) is not None:
            raise OptionError("output", f"{p.content} would be written to {long}; give the content a shorter name")
        if target in (fold(p.content.resolve()), fold(style.resolve())):
            raise OptionError("output", f"{p.output} is one of the inputs; writing it would replace that image: give another output")
        if target in seen:
            raise OptionError("contents", f"{seen[target]} and {p.content} would both write {p.output}; rename one of them, or "
                                          "optimize them into different output folders")  # fmt: skip
        seen[target] = p.content
        state = state_dir_for(p.output)
        if foreign_state(state):
            raise OptionError("output", f"{state}, where {p.output.name}'s optimization state is saved, holds something else: move it "
                                        "away")  # fmt: skip
    return pairs


def check_style(style: str | os.PathLike, max_pixels: int, pairs: Sequence[Pair] = (), skip_existing: bool = False) -> None:
    """`ImageError` naming the style where it cannot be read or is above ``max_pixels``: every content would fail on it.

    The header first (a style too large is refused before it is decoded), then the whole read each content's run makes
    anyway (a truncated file has a good header: every content failed on it in turn, the model opened for nothing); it
    runs before the model opens. Not where every one of ``pairs`` is skipped for its existing output (``skip_existing``):
    nothing reads the style then.
    """
    if skip_existing and pairs and all(p.output is not None and output_exists(p.output) and not (state_dir_for(p.output) / "state.json").is_file()
                                       for p in pairs):  # fmt: skip
        return
    header = image_header(Path(style))
    if header is None:
        read_input(Path(style), "style", max_pixels)  # raises, saying why
        return
    try:
        check_pixels(style, header[0], header[1], max_pixels)
    except ImageError as exc:
        raise as_role("style", exc) from None
    read_input(Path(style), "style", max_pixels)  # raises, saying why; the pixels are read again by each run


def check_budget(optimizer: Optimizer, options: OptimizeOptions, pairs: Sequence[Pair]) -> None:
    """`OptionError` (``max_memory``) when the budget holds no content's last scale (judged from the headers).

    A budget some images fit is left to each image: those that do not fail alone.
    """
    found: list[OptionError] = []
    for pair in pairs:
        hw = resized_header(pair.content, 0)
        if hw is None:
            return  # unreadable: its own run says why; the others run
        try:
            optimizer.check_budget(options, *hw)
            return
        except OptionError as exc:
            found.append(exc)
    if found:
        raise found[0]


def run_batch(
    optimizer: Optimizer,
    pairs: Sequence[Pair],
    options: OptimizeOptions,
    *,
    skip_existing: bool = False,
    on_progress: PairProgress | None = None,
    on_result: Callable[[PairResult], None] | None = None,
) -> BatchSummary:
    """Optimize every pair with an open ``optimizer``; one `PairResult` each, in order (``on_result`` as each ends).

    Ctrl-C raises `BatchInterrupted` with the pairs done so far; the image in
    progress keeps its saved state (``save_every``), and the same call resumes it.
    """
    optimizer.check(options)  # before any image: layers the loss network lacks
    for folder in {p.output.parent for p in pairs if p.output is not None}:
        if folder.is_dir():
            sweep_stale(folder)  # temp files and state folders of killed runs (their writer is gone)
    summary = BatchSummary(planned=len(pairs))
    t0 = time.perf_counter()
    made = [f for out in {p.output.parent for p in pairs if p.output is not None} for f in (out, *out.parents) if not f.exists()]
    try:
        _run_pairs(optimizer, pairs, options, summary, t0, skip_existing, on_progress, on_result)
    finally:  # a folder this batch made and nothing went into (every content failed): not left behind
        for folder in sorted(set(made), key=lambda f: len(f.parts), reverse=True):  # the deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def _run_pairs(optimizer: Optimizer, pairs: Sequence[Pair], options: OptimizeOptions, summary: BatchSummary, t0: float,
               skip_existing: bool, on_progress: PairProgress | None,
               on_result: Callable[[PairResult], None] | None) -> None:  # fmt: skip
    """`run_batch`'s loop: each pair's result into ``summary``; once an output finds its disk full, the rest are not run."""
    full: tuple[Path, OSError] | None = None
    for pair in pairs:
        out = pair.output
        assert out is not None
        started = time.perf_counter()
        error: Exception | None = None
        if skip_existing and output_exists(out) and not optimizer.resumes(pair.content, pair.style.paths[0], options, state_dir_for(out)):
            result = PairResult(pair, "skipped")  # (an interrupted run's state that this run would resume is resumed instead)
        elif full is not None:
            result = not_made_disk_full(pair, *full)
        else:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                image = optimizer.run(
                    pair.content, pair.style.paths[0], output=out, state_dir=state_dir_for(out), options=options,
                    on_progress=None if on_progress is None else (lambda e, pair=pair: on_progress(pair, e)),
                )  # fmt: skip
                result = PairResult(pair, "done", seconds=time.perf_counter() - started, megapixels=image.shape[0] * image.shape[1] / 1e6)
            except KeyboardInterrupt:
                summary.wall_seconds = time.perf_counter() - t0
                raise BatchInterrupted(summary, unfinished=(pair,)) from None
            except ImageError as exc:  # its remedy goes with it: a front end says the setting its way
                error = exc
                result = PairResult(pair, "failed", str(exc), time.perf_counter() - started, remedy=getattr(exc, "remedy", None))
            except OptionError as exc:  # a setting this image cannot take (its canvases and tiles in the budget)
                result = PairResult(pair, "failed", f"{pair.content}: {exc}", time.perf_counter() - started, option=exc.option,
                                    remedy=getattr(exc, "remedy", None))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - this content fails, the batch goes on
                error = exc
                result = PairResult(pair, "failed", f"{pair.content}: optimization failed ({type(exc).__name__}: {exc})",
                                    time.perf_counter() - started, remedy=getattr(exc, "remedy", None))  # fmt: skip
        if error is not None and full is None and (disk := disk_full(error)) is not None:
            full = (out, disk)
        summary.results.append(result)
        if on_result is not None:
            on_result(result)


def optimize_batch(
    contents: str | os.PathLike | Sequence[str | os.PathLike],
    style: str | os.PathLike,
    output: str | os.PathLike,
    *,
    model: Any = DEFAULT_MODEL,
    device: str = "cpu",
    dtype: Any = None,
    threads: int = 0,
    progress: bool = True,
    skip_existing: bool = False,
    shard: str | tuple[int, int] | None = None,
    on_progress: PairProgress | None = None,
    on_result: Callable[[PairResult], None] | None = None,
    **settings: Unpack[OptimizeSettings],
) -> BatchSummary:
    """What `ultrastyle optimize` does: every content image (files, folders, globs) with ``style``, into ``output``.

    ``output``: a folder (``{content}_optimized_{style}.{format}``), or a file
    name for one content (its suffix gives the format). ``settings``: as
    `make_optimize_options` (iterations, scales, init, max_memory, ...).
    ``model``, ``device``, ``dtype``, ``threads``, ``progress``: as `Optimizer`. ``shard``: ``"K/N"`` or ``(K, N)``, the K-th
    of N parts of the contents, dealt round-robin (`runtime.pairs.deal`): one part per machine, into one shared folder.
    A bad file fails alone; a budget too small for every content, a bad
    setting or a missing style is an `OptionError` before any image, and an
    unreadable style an `ImageError`. Each image's state is saved beside its
    output every ``save_every`` iterations (10, as the command line: the image,
    its gradient and the solver's history, written whole) and removed once done.
    """
    known_keywords(settings, _SETTINGS, named=CALL_KEYWORDS)  # the model's settings are this function's own keywords
    if is_file_output(output):
        from ultrastyle.options import output_format

        settings["format"] = output_format(output, settings.get("format"), FORMATS)
    options, part = make_optimize_options(**settings), check.shard("shard", shard)
    pairs = deal(plan_outputs(contents, style, output, options.format), part)
    check_style(style, options.max_pixels, pairs, skip_existing)
    loss_dtype = {} if dtype is None else {"dtype": dtype}  # None: the Optimizer's default (float32)
    with Optimizer(model, device=device, threads=threads, progress=progress, **loss_dtype) as optimizer:
        check_budget(optimizer, options, pairs)
        return run_batch(optimizer, pairs, options, skip_existing=skip_existing, on_progress=on_progress, on_result=on_result)
