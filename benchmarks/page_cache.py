"""Tiled stylization when the scratch canvases outgrow the page cache: per-pass wall, CPU and disk traffic.

At a gigapixel the scratch canvases and feature caches (63 GiB) are larger
than the machine's RAM, so they go through the disk where a 100 MP run's
stay in the page cache. This emulates that ratio at a size that runs in
minutes: a helper process holds all but ``--page-cache`` GiB of the
available RAM (anonymous memory; with no swap the kernel cannot take it
back), so the run's scratch meets a page cache about as small, relative to
it, as a gigapixel's. Each run prints one row per pass of the cascade (pass 1
"encode", pass 2 "decode"; the rest of the run is "other": read, output,
start-up) with wall and CPU seconds and the bytes read from and written to
the disk (``/proc/self/io``: read_bytes are page-cache misses).

    python benchmarks/page_cache.py --megapixels 100 --page-cache none,2.2

Linux only (``/proc``). Run as root to drop the page cache before each run
(else earlier runs' pages stay warm). Needs the vips extra (to build the
content) and the CD models (``--model``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ULTRASTYLE_SHARED", REPO.parent / "shared"))

_HOG = """
import sys, numpy as np
held = np.ones(int(float(sys.argv[1]) * 2**30) // 8)  # written, so resident
print("ready", flush=True)
sys.stdin.read()
"""


@functools.cache
def _gigapixel_module():
    spec = importlib.util.spec_from_file_location("gigapixel_bench", Path(__file__).with_name("gigapixel.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def profile(content: Path, args: argparse.Namespace, work: Path, page_cache: float | None) -> tuple[dict[str, list[float]], int]:
    """Per-pass [wall s, cpu s, read bytes, write bytes] of one run, and its peak RSS."""
    from ultrastyle.runtime.memory import available_bytes

    hog = None
    if page_cache is not None:
        # Leave page_cache GiB beside the run itself (its peak is about the baseline plus the budget).
        run_peak = 0.65 * 2**30 + _parse(args.max_memory)
        hold = (available_bytes() - run_peak - page_cache * 2**30) / 2**30
        if hold <= 0:
            raise SystemExit(f"only {available_bytes() / 2**30:.1f} GiB available: nothing to hold back for --page-cache {page_cache}")
        hog = subprocess.Popen([sys.executable, "-c", _HOG, f"{hold:.2f}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if hog.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise SystemExit("the memory-holding process did not start")
    try:
        if not drop_page_cache():
            print("(not root: the page cache is not dropped before the run)", file=sys.stderr)
        out, scratch, log = work / "out", work / "scratch", work / "passes.jsonl"
        scratch.mkdir(exist_ok=True)
        argv = ["stylize", str(content), "--style", args.style, "-o", str(out), "--model", args.model,
                "--max-memory", args.max_memory, "--format", "tiff", "--scratch", str(scratch), "--max-pixels", str(2 * 10**9)]  # fmt: skip
        r = subprocess.run([sys.executable, "-c", _gigapixel_module()._RUN, str(log), *argv], capture_output=True, text=True)
        shutil.rmtree(out, ignore_errors=True)
        if r.returncode != 0:
            raise SystemExit(f"exit {r.returncode}\n{r.stderr[-2000:]}")
    finally:
        if hog is not None:
            hog.stdin.close()  # type: ignore[union-attr]
            hog.wait()
    passes, peak, _ = _gigapixel_module().read_passes(log)
    return passes, peak


def _parse(size: str) -> int:
    from ultrastyle.core.tile_memory import parse_bytes

    return parse_bytes(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megapixels", type=float, default=100.0)
    ap.add_argument("--page-cache", default="none,2.2",
                    help="GiB of page cache to leave per run, comma-separated; 'none': hold nothing back")  # fmt: skip
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--model", default=str(SHARED / "models/cd-wct-16x"))
    ap.add_argument("--photo", default=str(SHARED / "images/large/lomiri_seeding_by_Clements_Engelhardt.jpg"))
    ap.add_argument("--style", default=str(SHARED / "images/style/cd_style_in1.jpg"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ultrastyle-page-cache-") as tmp:
        work = Path(tmp)
        gp = _gigapixel_module()
        content = gp.make_content(Path(args.photo), args.megapixels, work / "content")
        for setting in args.page_cache.split(","):
            page_cache = None if setting == "none" else float(setting)
            passes, peak = profile(content, args, work, page_cache)
            name = "RAM as it is" if page_cache is None else f"{page_cache:g} GiB of page cache left"
            print(f"\n{args.megapixels:g} MP, --max-memory {args.max_memory}, {name}: peak RSS {peak / 2**30:.2f} GiB\n")
            print(gp.PASS_HEADER)
            print("\n".join(gp.pass_rows(passes)), flush=True)

if __name__ == "__main__":
    main()
