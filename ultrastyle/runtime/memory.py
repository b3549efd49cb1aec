"""Process memory: glibc's heap (kept, trimmed), huge pages, and what the process holds and may still get.

The tile planner's model of activation memory is `core.tile_memory`; what
the heap's retention adds on top of it for eager PyTorch is `heap_factor`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
import threading
from pathlib import Path


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # glibc only; musl has neither
    except (OSError, AttributeError):  # musl or an exotic libc: nothing to tune
        return None
    return libc


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's (malloc/malloc.c: DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX)
_HEAP_KEEPS_FREED = False
_KEPT_FOR_GOOD = False  # `keep_freed_memory` was called: no holder puts the defaults back
_HOLDERS = 0
_HOLD_LOCK = threading.Lock()
_rss_after_trim: int | None = None
# Peak resident memory of eager PyTorch tiles over the planner's model while the heap keeps
# freed memory: the heap fragments over a tile's layers (PyTorch's 64-byte aligned blocks rarely
# fit the holes their predecessors left). Measured with trims past 3/4 of a 1 GB budget: factor
# 2.5 -> 40 MP 1.73 GiB peak; factor 2 with trims past the whole budget -> 2.24 GiB.
HEAP_KEEP_FACTOR = 2.5
# The same with huge pages (`use_huge_pages`): page-aligned blocks fragment less.
# Measured at 8 MP: factor 2 -> 1.34 GiB peak and 2.8 s/MP; 2.5 -> 1.2-1.3 GiB, 3.1 s/MP.
HUGE_PAGE_HEAP_FACTOR = 2.0
_HUGE_PAGES = False


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory for large tensors instead of unmapping it, for the process's life; True where applied.

    By default glibc serves every allocation above 32 MB with a fresh mmap and
    unmaps it on free, so each full-resolution activation of every layer faults
    in zeroed pages: measured at 8 MP (benchmarks/tiled_scaling.py), 15.8M minor
    faults and about half the wall time of the PyTorch paths. Served from the
    heap and kept there on free, later layers and tiles reuse the pages; the
    tiled pipeline gives them back with `trim_heap` (after tiles, once the
    resident set has grown past a limit, and between passes). Process-wide, so
    the command line calls it (``ULTRASTYLE_MALLOC=system`` opts out); a
    `Stylizer` holds it while open (`hold_freed_memory`).
    """
    global _KEPT_FOR_GOOD
    kept = _keep_freed()
    _KEPT_FOR_GOOD = _KEPT_FOR_GOOD or kept
    return kept


def hold_freed_memory() -> bool:
    """`keep_freed_memory` while a holder (an open `Stylizer`) needs it: `release_freed_memory` by the last holder puts
    glibc's settings back and hands the freed memory to the OS, so a service's own buffers are not kept after it."""
    global _HOLDERS
    with _HOLD_LOCK:
        kept = _keep_freed()
        _HOLDERS += kept
        return kept


def release_freed_memory() -> None:
    """One holder (`hold_freed_memory`) lets go; the last one, where nobody kept it for good, restores glibc's defaults."""
    global _HOLDERS, _HEAP_KEEPS_FREED
    with _HOLD_LOCK:
        if _HOLDERS == 0:
            return
        _HOLDERS -= 1
        libc = _libc()
        if _HOLDERS or _KEPT_FOR_GOOD or not _HEAP_KEEPS_FREED or libc is None:
            return
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _HEAP_KEEPS_FREED = False
        libc.malloc_trim(0)


def _keep_freed() -> bool:
    global _HEAP_KEEPS_FREED
    libc = _libc()
    if libc is None or _system_malloc_requested():
        return False
    if not _HEAP_KEEPS_FREED:
        # mmap requests fall back to the heap; free() trims the heap's top only past 1 TiB (i.e. on trim_heap).
        _HEAP_KEEPS_FREED = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**40 - 1))
    return _HEAP_KEEPS_FREED


def _system_malloc_requested() -> bool:
    """``ULTRASTYLE_MALLOC=system``: leave glibc's malloc and PyTorch's pages as they are."""
    return os.environ.get("ULTRASTYLE_MALLOC", "").lower() == "system"


def use_huge_pages() -> bool:
    """Ask PyTorch's CPU allocator for transparent huge pages on tensors of 2 MB and more; True where in effect.

    With the heap kept (`keep_freed_memory`), the tiled path still trims it
    when it grows past the budget, and the next tiles fault their pages in
    again: 4.4-5.1M minor faults at 8 MP. Huge pages fault in 2 MB at a time:
    0.47-0.49M faults, 16-18% less wall time and a lower peak RSS (measured
    in process, 8 MP, 1 GB budget; benchmarks/README.md), which leaves room
    for larger tiles (`HUGE_PAGE_HEAP_FACTOR`). For tiled eager PyTorch on the
    CPU only (``stylize`` asks for it there): the whole-image path never
    trims, and its peak RSS grew by half; ONNX Runtime allocates its own.

    PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU allocation,
    so this must run before any tensor exists; an explicit
    ``THP_MEM_ALLOC_ENABLE=0`` or ``ULTRASTYLE_MALLOC=system`` is respected.
    """
    if _huge_pages_opted_out() or transparent_huge_pages() in (None, "never"):
        return False  # (never: PyTorch would still align blocks to pages, for nothing)
    global _HUGE_PAGES
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    _HUGE_PAGES = huge_pages_in_effect()
    return _HUGE_PAGES


def _huge_pages_opted_out() -> str | None:
    """What keeps `use_huge_pages` off here, or None."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if _system_malloc_requested():
        return "ULTRASTYLE_MALLOC=system"
    if os.environ.get("THP_MEM_ALLOC_ENABLE", "1") in ("0", ""):
        return "THP_MEM_ALLOC_ENABLE=0"
    return None


def huge_pages_in_effect() -> bool:
    """Whether PyTorch's CPU allocator page-aligns its blocks, as it does with ``THP_MEM_ALLOC_ENABLE``.

    Two 4 MB blocks, both page-aligned: by chance 1 in 4096 with the default 64-byte alignment.
    (Whether the kernel offers huge pages at all is `transparent_huge_pages`.)
    """
    import torch

    blocks = [torch.empty(2**20) for _ in range(2)]
    page = os.sysconf("SC_PAGE_SIZE")
    return all(b.data_ptr() % page == 0 for b in blocks)


def transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def describe_memory_setup() -> str:
    """One line for ``ultrastyle doctor``: what the commands do to malloc here, and whether huge pages exist."""
    if _libc() is None:
        heap = "not glibc: malloc left as it is"
    elif _system_malloc_requested():
        heap = "glibc malloc left as it is (ULTRASTYLE_MALLOC=system)"
    else:
        heap = "glibc: commands keep freed memory for reuse (ULTRASTYLE_MALLOC=system opts out)"
    mode, off = transparent_huge_pages(), _huge_pages_opted_out()
    if mode in (None, "never"):
        pages = f"transparent huge pages {mode or 'unknown'}: tiled PyTorch runs fault 4 KB pages"
    elif off:
        pages = f"transparent huge pages '{mode}', not used ({off})"
    else:
        pages = f"transparent huge pages '{mode}': tiled PyTorch runs use them"
    return f"{heap}; {pages}"


def heap_factor() -> float:
    """What the heap's retention adds to eager PyTorch's tile memory once `keep_freed_memory` ran.

    `HEAP_KEEP_FACTOR`, or `HUGE_PAGE_HEAP_FACTOR` with `use_huge_pages` in effect; 1 otherwise.
    """
    if not _HEAP_KEEPS_FREED:
        return 1.0
    return HUGE_PAGE_HEAP_FACTOR if _HUGE_PAGES else HEAP_KEEP_FACTOR


def trim_heap(keep_bytes: int | None = None) -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise; RSS would creep per stage).

    ``keep_bytes``: only once the resident set has grown by more than this
    since the last trim (a trim makes the next tile fault its pages in
    again); before any trim, since the first such call, which only takes
    the reference. Trimming at that first call cost a 2 MP ONNX Runtime
    run ~15% of its time in re-faulted pages and lowered no peak.
    """
    global _rss_after_trim
    libc = _libc()
    if libc is None:
        return
    rss = resident_bytes() if keep_bytes is not None else None
    if rss is not None:  # (unknown: trim, as without keep_bytes)
        if _rss_after_trim is None:
            _rss_after_trim = rss
            return
        if rss - _rss_after_trim <= keep_bytes:
            return
    libc.malloc_trim(0)
    _rss_after_trim = resident_bytes()


def release_free_memory() -> None:
    """`trim_heap` unconditionally (between passes and images)."""
    trim_heap()


def resident_bytes() -> int | None:
    """The process's resident set (Linux /proc; Windows: its working set); None where unknown (macOS)."""
    if os.name == "nt":
        counters = _windows_memory_counters()
        return None if counters is None else int(counters.WorkingSetSize)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int | None:
    """The process's peak resident set so far: getrusage's ``ru_maxrss`` (KiB on Linux, bytes on macOS), Windows' peak
    working set; None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        counters = _windows_memory_counters()
        return None if counters is None else int(counters.PeakWorkingSetSize)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _windows_memory_counters():  # noqa: ANN202 - a ctypes structure, Windows only
    """PROCESS_MEMORY_COUNTERS of this process (psapi GetProcessMemoryInfo), None where it cannot be read."""
    import ctypes
    from ctypes import wintypes

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
            (name, ctypes.c_size_t) for name in ("PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                                                 "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")
        ]  # fmt: skip

    try:
        kernel32, psapi = ctypes.WinDLL("kernel32"), ctypes.WinDLL("psapi")  # type: ignore[attr-defined]
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        psapi.GetProcessMemoryInfo.argtypes = [wintypes.HANDLE, ctypes.POINTER(Counters), wintypes.DWORD]
        counters = Counters()
        counters.cb = ctypes.sizeof(Counters)
        if not psapi.GetProcessMemoryInfo(kernel32.GetCurrentProcess(), ctypes.byref(counters), counters.cb):
            return None
        return counters
    except (OSError, AttributeError):
        return None


def disk_free(folder: str | os.PathLike | None = None) -> int | None:
    """Free bytes on the disk of ``folder`` (None: the temp folder, where scratch canvases go by default); None if unknown."""
    import shutil
    import tempfile

    try:
        return shutil.disk_usage(folder or tempfile.gettempdir()).free
    except OSError:  # not there yet, or not a folder: the canvas allocation will say so
        return None


def available_bytes() -> int:
    """RAM available to new allocations now: /proc/meminfo's MemAvailable (Linux), else free physical pages; 0 if unknown.

    Within a memory cgroup's limit (a container's, a SLURM or Kubernetes job's: `cgroup_room`), whatever the node has.
    """
    found = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            found = 0
    room = cgroup_room()
    return found if room is None or not found else min(found, room)


CGROUP_FILE, CGROUP_ROOT = "/proc/self/cgroup", "/sys/fs/cgroup"
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def cgroup_room() -> int | None:
    """Bytes this process's memory cgroups let it add now: each enclosing group's limit less its use (its reclaimable
    inactive page cache not counted as used), the least of them; None without a limit, or off Linux.

    cgroup v2 (``memory.max``, ``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``). A job
    on a large node was planned by the node's free memory, and its scratch canvases in RAM were killed by its own limit.
    """
    try:
        with open(CGROUP_FILE) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, names = Path(CGROUP_ROOT), ("memory.max", "memory.current", "inactive_file")
        elif "memory" in parts[1].split(","):
            base, names = Path(CGROUP_ROOT) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        group = base / parts[2].lstrip("/")
        for d in [group, *group.parents]:
            limit, used = _cgroup_number(d / names[0]), _cgroup_number(d / names[1])
            if limit is not None and used is not None and limit < _UNLIMITED:
                rooms.append(max(0, limit - max(0, used - _cgroup_stat(d / "memory.stat", names[2]))))
            if d == base:
                break
    return min(rooms) if rooms else None


def _cgroup_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


_BASELINE_SCRIPT = """
import sys, numpy as np
import ultrastyle
from ultrastyle.runtime.memory import peak_resident_bytes
rng = np.random.default_rng(0)
with ultrastyle.load(sys.argv[1], backend=sys.argv[2], device=sys.argv[3]) as st:
    st.stylize((rng.random((8, 8, 3)) * 255).astype(np.uint8), (rng.random((16, 16, 3)) * 255).astype(np.uint8))
peak = peak_resident_bytes()
sys.exit("this platform reports no peak memory") if peak is None else print(peak)
"""


def measure_baseline(model: str, backend: str = "onnxruntime", device: str = "cpu", timeout: float = 600) -> int:
    """The peak resident bytes of a fresh process that opens ``model`` on ``backend`` and stylizes an 8x8 image.

    That is the memory a run holds whatever its images: the interpreter, the
    libraries and the model (networks, sessions, arenas). ``max_memory`` bounds
    what a run takes above it: peak RSS <= baseline + max_memory
    (tests/test_memory_rule.py holds a run to that). Measured in a child
    process, so this process's own state does not count. Raises RuntimeError
    with the child's last error line when it fails.
    """
    import subprocess

    r = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, model, backend, device], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring the memory baseline of {model} on {backend} failed: {last}")
    return int(r.stdout.strip().splitlines()[-1])
