"""The validators of a run's settings: `api.make_options`, `optimization.run.make_optimize_options`, the runner options
(`runtime.backends.select.check_runner_options`), training configs, calibration settings and the Ray pool.

One rule per keyword: a setting several resolvers take (``max_memory``,
``tile``, ``content_size``, ``style_size``, ``max_pixels``, ``format``,
``threads``, ``device``) is checked by the same function in each and fails
with the same `OptionError`.
Each function is pure: it returns the resolved value or raises `OptionError`
whose ``option`` is the Python keyword (``max_memory``) and whose message says
what was expected, what came and how to fix it, in the library's terms (the
command line maps keywords to its flags).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from ultrastyle.core.arch import STAGES, parse_levels
from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.errors import Setting, remedied
from ultrastyle.io.atomic import partial_path
from ultrastyle.io.constants import IMAGE_SUFFIXES, OUTPUT_FORMATS, format_name
from ultrastyle.models.defaults import METHODS

__all__ = [
    "OptionError", "alpha", "choice", "count", "device", "known_keywords", "format_choice", "halo_width", "image_size", "levels",
    "memory_budget", "method", "number", "output_folder", "output_format", "pixel_limit", "scratch_folder", "shard", "thread_count",
    "tile_side",
]  # fmt: skip

# More threads than this per core spin rather than work: thousands of them stall a run.
MAX_THREADS_PER_CORE = 4

_SIZE_EXAMPLES = "512MB, 2GB, 1.5GiB, 1073741824"


class OptionError(ValueError):
    """A setting with a bad value; ``option`` is its keyword name (``max_memory``), for front ends to map to their flag."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def _whole(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def count(option: str, value: object, *, least: int = 0, what: str = "") -> int:
    """A whole number (int or numpy integer, not bool) >= ``least``; ``what`` describes it in the message."""
    expected = f"a whole number{' of ' + what if what else ''} >= {least}"
    if not _whole(value):
        raise OptionError(option, f"expected {expected}, got {value!r} ({type(value).__name__}); give an int such as {max(least, 1)}")
    if value < least:
        raise OptionError(option, f"expected {expected}, got {value}; give {least} or more")
    return int(value)


def number(option: str, value: object, *, least: float | None = None, above: float | None = None, example: float = 1.0) -> float:
    """A finite real number (int, float or numpy scalar, not bool or text), ``>= least`` and ``> above`` where given."""
    bounds = ([f">= {least:g}"] if least is not None else []) + ([f"> {above:g}"] if above is not None else [])
    expected = "a number" + (f" {' and '.join(bounds)}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise OptionError(option, f"expected {expected}, got {value!r} ({type(value).__name__}); give e.g. {example:g}")
    if (least is not None and value < least) or (above is not None and value <= above):
        raise OptionError(option, f"expected {expected}, got {value:g}; give e.g. {example:g}")
    return float(value)


def usable_cpus() -> int:
    """CPUs this process may use: its affinity (a SLURM job's or ``taskset``'s cores), within a cgroup v2 ``cpu.max``
    quota (a container's CPU limit), else the machine's count. A 4-core job on a 128-core node is 4, not 128."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open(CGROUP_FILE) as f:
            lines = f.read().splitlines()
    except OSError:
        return max(1, n)
    for line in lines:  # the process's group and every group above it: a job's limit may sit on a parent
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # v2: "quota period" in cpu.max, "max" for none
            base, read = Path(CGROUP_ROOT), lambda d: (d / "cpu.max").read_text().split()[:2]
        elif "cpu" in parts[1].split(","):  # v1: cfs_quota_us (-1 for none) and cfs_period_us
            base = Path(CGROUP_ROOT) / parts[1]
            read = lambda d: [(d / "cpu.cfs_quota_us").read_text().strip(), (d / "cpu.cfs_period_us").read_text().strip()]  # noqa: E731
        else:
            continue
        group = base / parts[2].lstrip("/")
        for d in [group, *group.parents]:
            try:
                quota, period = read(d)
                if quota not in ("max", "-1"):
                    n = min(n, max(1, math.ceil(int(quota) / int(period))))
            except (OSError, ValueError):
                pass
            if d == base:
                break
    return max(1, n)


CGROUP_FILE, CGROUP_ROOT = "/proc/self/cgroup", "/sys/fs/cgroup"


def thread_count(option: str, value: object) -> int:
    """``threads``: 0 (one per core, or the library's default) or a number of threads, at most `MAX_THREADS_PER_CORE` per core."""
    n = count(option, value, what="threads (0: the library's default)")
    cores = usable_cpus()
    if n > MAX_THREADS_PER_CORE * cores:
        raise OptionError(option, f"{n} threads are more than {MAX_THREADS_PER_CORE} per core ({cores} cores here); give at most "
                                  f"{MAX_THREADS_PER_CORE * cores}, or 0 for the default")  # fmt: skip
    return n


def device(option: str, value: object) -> str:
    """``device``: ``cpu``, ``cuda`` or ``cuda:N`` in any case, as lower case (whether that device exists is the runner's to say)."""
    if not isinstance(value, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", value.lower()):
        raise OptionError(option, f"expected cpu, cuda or cuda:N, got {value!r}; give one of them")
    return value.lower()


def device_index(device: str) -> int:
    """The GPU index of a checked ``device``: N of ``cuda:N``, 0 for ``cuda`` (and ``cpu``)."""
    return int(device.partition(":")[2] or 0)


def cuda_shortfall(device: str, count: int) -> str | None:
    """Why a checked ``device`` cannot run where PyTorch sees ``count`` CUDA devices, else None (the CPU always runs)."""
    if not device.startswith("cuda"):
        return None
    if count == 0:
        return "no CUDA device is available to PyTorch here"
    return f"PyTorch sees {count} CUDA device(s) here, cuda:0 to cuda:{count - 1}" if device_index(device) >= count else None


def image_size(option: str, value: object, *, none: str | None = None) -> int | None:
    """``content_size`` / ``style_size``: 0 keeps the image's own size, else its long side in pixels (a whole number >= 1).

    ``none``: what None means where a resolver takes it (else None is refused).
    """
    keep = "0 (keep the image's own size) or a long side in pixels >= 1" + (f", or None ({none})" if none else "")
    if value is None and none:
        return None
    if not _whole(value):
        raise OptionError(option, f"expected {keep}, got {value!r} ({type(value).__name__}); give a whole number such as 0 or 1024")
    if value < 0:
        raise OptionError(option, f"expected {keep}, got {value}; give 0 to keep the size or a positive number of pixels")
    return int(value)


def pixel_limit(option: str, value: object) -> int:
    """``max_pixels``: the largest image (width x height) to decode, a whole number >= 1."""
    expected = "a whole number of pixels >= 1 (the largest width x height to decode)"
    if not _whole(value):
        raise OptionError(option, f"expected {expected}, got {value!r} ({type(value).__name__}); give an int such as 400000000")
    if value < 1:
        raise OptionError(option, f"expected {expected}, got {value}; give a positive limit, e.g. 400000000")
    return int(value)


def memory_budget(option: str, value: object) -> int | None:
    """``max_memory`` / ``io_memory``: None (no budget), a number of bytes or a size text (``"2GB"``), above 0 either way."""
    expected = "a number of bytes or a size such as '2GB', above 0"
    if value is None:
        return None
    if isinstance(value, str):
        try:
            budget = parse_bytes(value)
        except ValueError:
            raise OptionError(option, f"expected {expected}, got {value!r}; examples: {_SIZE_EXAMPLES}") from None
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise OptionError(option, f"expected {expected}, got {value!r}; examples: {_SIZE_EXAMPLES}")
        budget = int(value)
    else:
        raise OptionError(option, f"expected {expected}, got {value!r} ({type(value).__name__}); examples: {_SIZE_EXAMPLES}")
    if budget <= 0:
        raise OptionError(option, f"expected {expected}, got {value!r} ({budget} bytes); give a positive budget, e.g. 2GB")
    return budget


def _side_or_word(option: str, value: object, word: str, least: int, expected: str, example: str) -> int | None:
    """None or ``word`` (any case) -> None; else a whole number >= ``least`` (digits in a string too)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == word:
            return None
        if not text.isdigit():
            raise OptionError(option, f"expected {expected}, got {value!r}; give {example}")
        value = int(text)
    if not _whole(value):
        raise OptionError(option, f"expected {expected}, got {value!r} ({type(value).__name__}); give {example}")
    if value < least:
        raise OptionError(option, f"expected {expected}, got {value}; give {example}")
    return int(value)


def tile_side(option: str, value: object) -> int | None:
    """``tile``: None or ``"auto"`` (fitted to the budget), else a core side in pixels, a whole number >= 1 (digits in a string too).

    Sides below a stage's grid are rounded up to it by the planners.
    """
    return _side_or_word(option, value, "auto", 1, "'auto' or a positive whole number of pixels (the tile core side)",
                         "a positive side such as 512, or 'auto' to fit the memory budget")  # fmt: skip


def halo_width(option: str, value: object) -> int | None:
    """``halo``: None or ``"exact"`` (the exact result), else at most that many pixels, a whole number >= 0 (approximate)."""
    return _side_or_word(option, value, "exact", 0, "'exact' or a whole number of pixels >= 0 (an approximate halo)",
                         "'exact' for the exact result, or 0 or more pixels such as 32")  # fmt: skip


def shard(option: str, value: object) -> tuple[int, int] | None:
    """``"K/N"`` or ``(K, N)``: the K-th of N parts of a batch (K counts from 1, as in ``split -n K/N``), or None for all of it."""
    if value is None:
        return None
    example = "give e.g. '2/4' (the second of four parts)"
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
        if m is None:
            raise OptionError(option, f"expected K/N, got {value[:40]!r}; {example}")
        k, n = int(m[1]), int(m[2])
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_whole(v) for v in value):
        k, n = int(value[0]), int(value[1])
    else:
        raise OptionError(option, f"expected K/N or a pair (K, N), got {value!r} ({type(value).__name__}); {example}")
    if n < 1 or not 1 <= k <= n:
        raise OptionError(option, f"expected 1 <= K <= N, got {k}/{n}; K counts from 1 (a SLURM array from 0: "
                                  "$((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT)")  # fmt: skip
    return k, n


def no_empty_path(option: str, values: Collection[str | os.PathLike], give: str = "a file, a folder or a glob") -> None:
    """Refuses an empty path among ``values``: ``Path("")`` is the current folder, which an unset variable would stylize whole."""
    if any(os.fspath(v) == "" for v in values):
        raise OptionError(option, f"an empty path (an unset shell variable?); give {give}")


P = TypeVar("P")


def user_path(value: P) -> P:
    """``value`` with a leading ``~`` expanded where it is a path (a str, or a path object), as a shell expands it; anything
    else (a `Bundle`, None) as given. Python itself does not: a literal ``~`` folder would be made in the working directory."""
    if isinstance(value, str):
        return os.path.expanduser(value)  # type: ignore[return-value]
    if isinstance(value, os.PathLike):
        return Path(value).expanduser()  # type: ignore[return-value]
    return value


def model_path(value: P, option: str = "model", give: str = "a zoo name (ultrastyle models list) or a model folder") -> P:
    """A model (or a bundle) as given, ``~`` expanded (`user_path`); an empty one is refused as ``option`` (``""`` is the
    current folder: "no model weights in ." said nothing of the cause)."""
    if isinstance(value, (str, os.PathLike)):
        no_empty_path(option, [value], give)
    return user_path(value)


def output_folder(option: str, value: str | os.PathLike) -> Path:
    """A folder that outputs go into (returned, ``~`` expanded): absent (it is made) or a folder we may write, and not named
    like an image file.

    Checked before any work: a file there (or above it), or a folder we may not
    write (a read-only mount), would fail every output at its write, after all
    the compute.
    """
    no_empty_path(option, [value], "a folder")
    path = Path(value).expanduser()  # as a shell would: from Python, a literal "~" folder would be made here
    if path.exists() and not path.is_dir():
        raise OptionError(option, f"{path} is a file, and outputs go into a folder; give a folder (absent or existing)")
    if why := unwritable_folder(path):
        raise OptionError(option, f"{why}; give a folder you can write")
    if not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES | {".dzi"}:  # `result.jpg` would become a folder of that name
        raise remedied(OptionError(option, f"{path} looks like a file name, but outputs go into a folder of that name (one file "
                                           "per content and style); give a folder, and the format separately (format)"), Setting("format"))  # fmt: skip
    return path


def unwritable_folder(path: Path) -> str | None:
    """Why folder ``path`` (made where absent) cannot be written: it or the nearest entry above it a file or a link to
    nothing (`exists` follows links: a broken one passed as absent, then every write failed), or not writable; None
    where it can."""
    here = path.absolute()
    where = next((p for p in (here, *here.parents) if os.path.lexists(p)), None)
    if where is None:
        return None
    said = f"{path} is" if where == here else f"{path} cannot be made: {where} is"
    if where.is_symlink() and not where.exists():
        return f"{said} a link to {os.readlink(where)}, which does not exist"
    if not where.is_dir():
        return f"{said} a file"
    if not os.access(where, os.W_OK | os.X_OK):  # EROFS too: a read-only mount answers no
        return f"{said} not writable (permissions or a read-only file system)"
    if (exc := _write_probe(where)) is not None:  # what os.access cannot tell (root, /proc, some mounts)
        return f"{said} not writable ({exc.strerror or exc})"
    return None


def _write_probe(folder: Path) -> OSError | None:
    """Why a folder cannot be made inside ``folder`` (a temporary one, removed at once), or None where it can."""
    probe = partial_path(folder / "probe")  # a kill right now leaves a name the next sweep of the folder removes
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as exc:
        return exc
    return None


def output_file(output: str | os.PathLike, inputs: Collection[object] = ()) -> Path:
    """The file one image is written to (returned, ``~`` expanded): not a folder, and none of ``inputs`` (those that are
    paths), which it would replace.

    Checked before any work, as `output_folder` is for a batch.
    """
    no_empty_path("output", [output], "a file name")
    path = Path(output).expanduser()
    if path.is_dir():
        raise OptionError("output", f"{path} is a folder; give a file name (the image's, such as {path / 'out.png'})")
    if why := unwritable_folder(path.parent):  # its folder is made where absent: a file there or above it failed after the compute
        raise OptionError("output", f"{why}; give a file in a folder you can write")
    target = path.resolve()
    for given in inputs:
        if isinstance(given, (str, os.PathLike)) and Path(given).expanduser().resolve() == target:
            raise OptionError("output", f"{path} is one of the inputs; writing it would replace that image: give another output")
    return path


def scratch_folder(option: str, value: str | os.PathLike | None) -> Path | None:
    """An existing folder for scratch canvases (unlinked files), or None for the system's temp folder."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        why = "is a file" if path.exists() else "does not exist"
        raise OptionError(option, f"{path} {why}; scratch canvases go into an existing folder (None: the system's temp folder)")
    if why := unwritable_folder(path):  # the command line refused it; Python took it, to fail mid-run
        raise OptionError(option, f"{why}; give a folder you can write (None: the system's temp folder)")
    return path


def choice(option: str, value: object, choices: Collection[str]) -> str:
    """One of ``choices`` in any case, spelt as there (the command line takes any case too: ``MinMax`` is ``minmax``)."""
    spelt = {c.casefold(): c for c in choices}.get(value.casefold()) if isinstance(value, str) else None
    if spelt is None:
        raise OptionError(option, f"expected one of {', '.join(choices)}, got {value!r}; give one of them")
    return spelt


def format_choice(option: str, value: object, formats: Collection[str]) -> str:
    """``format``: one of ``formats`` as `io.constants.format_name` spells it (any case; jpeg -> jpg, tif -> tiff)."""
    name = format_name(value) if isinstance(value, str) else None
    if name not in formats:
        raise OptionError(option, f"expected one of {', '.join(formats)}, got {value!r}; give one of them (jpeg and tif name jpg and tiff)")
    return name


def method(value: object) -> str | None:
    """``method``: None (the model's default) or one of `models.defaults.METHODS`."""
    if value is None:
        return None
    return choice("method", value, METHODS)


def alpha(value: object) -> float | None:
    """``alpha``: None (the model's default) or a number in 0..1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0.0 <= value <= 1.0:
        raise OptionError("alpha", f"expected a number in 0..1, got {value!r}; give e.g. 0.6 (0: the content's own features, decoded; 1: the full style)")
    return float(value)


def levels(value: object, option: str = "levels") -> tuple[int, ...] | None:
    """``levels``: None (the model's default), a stage, ``"5,4,3"`` or a sequence of stages of `core.arch.STAGES`, coarse to fine."""
    stages = f"{STAGES[0]}..{STAGES[-1]}"
    order = ", coarse to fine" if option == "levels" else ""
    if value is None:
        return None
    if _whole(value):
        value = (value,)
    if isinstance(value, str):
        try:
            return parse_levels(value)
        except ValueError:
            raise OptionError(option, f"expected comma-separated stage numbers {stages}{order}, got {value!r}; give e.g. 5,4,3") from None
    try:
        items = list(value)  # type: ignore[call-overload]
    except TypeError:
        items = []
    if not items or not all(_whole(k) and k in STAGES for k in items):
        raise OptionError(option, f"expected stage numbers {stages}{order}, got {value!r}; give e.g. (5, 4, 3) or '5,4,3'")
    return tuple(int(k) for k in items)


def stage_set(option: str, value: object) -> tuple[int, ...] | None:
    """Which stages a deployment step covers: None (every stage there is), a stage, ``"5,4"`` or a sequence; ascending, once each."""
    chosen = levels(value, option)
    return None if chosen is None else tuple(sorted(set(chosen)))


def known_keywords(settings: Collection[str], allowed: Collection[str], model_keys: Collection[str] = (), opener: str = "",
                   named: Collection[str] = (), calls: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """OptionError for a keyword that is no setting of a call: a typo (with the closest of ``allowed`` and ``named``, the
    call's own keyword arguments: ``mixes=`` means ``mix``), or one of ``model_keys``, the settings of the opened model,
    which belong to ``opener``. ``calls``: where settings are kept for calls to come (`load`), the keywords of those
    calls, which only they take, each with the call that takes it."""
    for name in settings:
        if name in allowed:
            continue
        if name in model_keys:
            raise OptionError(name, f"is a setting of the model, not of each call: give it to {opener}")
        if name in (calls or {}):
            raise OptionError(name, f"is an argument of {calls[name]}, not a setting kept for every call: give it there")  # type: ignore[index]
        close = difflib.get_close_matches(name, sorted({*allowed, *named} - {name}), n=1)  # `styles` to stylize: `style`
        raise OptionError(name, "unknown setting" + (f"; did you mean {close[0]!r}?" if close else f"; settings: {', '.join(sorted(allowed))}"))


def output_format(output: str | os.PathLike, given: str | None, formats: Collection[str] = OUTPUT_FORMATS) -> str:
    """The format to write ``output`` in: ``given``, which must agree with its suffix, else the suffix (none: png).

    ``formats``: what the caller writes (the optimizer writes no Deep Zoom folder).
    """
    suffix = Path(output).suffix.lstrip(".")
    if given is not None:  # a suffix that names no image format ("frame.0001") is just part of the name
        named = format_name(suffix) in OUTPUT_FORMATS or f".{suffix.lower()}" in IMAGE_SUFFIXES  # .webp holding PNG bytes: a lie
        if named and format_name(suffix) != format_name(str(given)):
            raise OptionError("format", f"format {given!r} but {os.fspath(output)} ends in .{suffix}; make them agree")
        return format_name(str(given))
    if suffix and f".{suffix.lower()}" in IMAGE_SUFFIXES and format_name(suffix) not in formats:  # .webp: read, not written
        raise OptionError("output", f"{os.fspath(output)}: .{suffix} images are read, not written; give the suffix of an output "
                                    f"format ({', '.join(formats)})")  # fmt: skip
    if suffix and format_name(suffix) not in formats:
        raise remedied(OptionError("output", f"{os.fspath(output)}: .{suffix} is no output format ({', '.join(formats)}); "
                                             "give another suffix, or the format (format)"), Setting("format"))  # fmt: skip
    return format_name(suffix) if suffix else "png"
