"""Gigapixel runs end to end: stream-read, tiled stylization within --max-memory, zoomable outputs.

Builds contents of the given sizes on disk by enlarging a photo with libvips
(streamed: the big image is never in memory), then runs ``ultrastyle stylize``
on each in a child process and reports wall time, s/MP, CPU seconds per wall
second (the cores kept busy: lower where the run waits on the scratch disk),
peak RSS (from the OS), the baseline (`measure_baseline`: interpreter, libraries and model), the
scratch disk the canvases took (the free space of the scratch folder's disk,
polled), and the time a streamed read of the content takes alone.

    python benchmarks/gigapixel.py --sizes 250,1000 --formats tiff,dzi --png-at 250
    python benchmarks/gigapixel.py --sizes 16,100 --formats tiff  # what fits a short session on 2 cores

Needs the vips extra and the CD models (``--model``, default ../shared/models/cd-wct-16x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ULTRASTYLE_SHARED", REPO.parent / "shared"))

# The child: the CLI, with the two passes of runtime.tiled wrapped to log their wall and CPU seconds and
# /proc/self/io deltas (read_bytes: page-cache misses), one JSON line per pass, and the peak RSS last.
_RUN = """
import json, os, resource, sys, time
import ultrastyle.runtime.tiled as tiled

log = open(sys.argv[1], "w")

def snap():
    u = resource.getrusage(resource.RUSAGE_SELF)
    io = {}
    if os.path.exists("/proc/self/io"):
        io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return [time.perf_counter(), u.ru_utime + u.ru_stime, int(io.get("read_bytes", 0)), int(io.get("write_bytes", 0))]

last = [snap()]

def mark(label):
    now = snap()
    log.write(json.dumps([label] + [b - a for a, b in zip(last[0], now)]) + "\\n")
    log.flush()
    last[0] = now

def timed(name, tag):
    inner = getattr(tiled, name)
    def run(model, stage, *args, **kwargs):
        mark("other")
        try:
            return inner(model, stage, *args, **kwargs)
        finally:
            mark(f"{tag} {stage}")
    setattr(tiled, name, run)

timed("encode_statistics", "encode")
timed("decode_tiles", "decode")
from ultrastyle.cli.main import app
try:
    app(sys.argv[2:])
finally:
    mark("other")
    u = resource.getrusage(resource.RUSAGE_SELF)
    log.write(json.dumps(["end", u.ru_maxrss * 1024, u.ru_utime + u.ru_stime]) + "\\n")
"""

PASS_HEADER = "| pass | wall s | cpu s | cpu/wall | disk read GiB | disk write GiB |\n|---|---|---|---|---|---|"


def read_passes(log: Path) -> tuple[dict[str, list[float]], int, float]:
    """Per-pass [wall s, cpu s, read bytes, write bytes] summed over a run's log (`_RUN`); its peak RSS and CPU seconds."""
    passes: dict[str, list[float]] = {}
    peak, cpu = 0, 0.0
    for line in log.read_text().splitlines():
        label, *values = json.loads(line)
        if label == "end":
            peak, cpu = int(values[0]), float(values[1])
            continue
        acc = passes.setdefault(label, [0.0] * 4)
        passes[label] = [a + v for a, v in zip(acc, values)]
    return passes, peak, cpu


def pass_rows(passes: dict[str, list[float]]) -> list[str]:
    """Markdown rows under `PASS_HEADER`, with a total."""
    total = [sum(v[i] for v in passes.values()) for i in range(4)]
    return [f"| {label} | {wall:.1f} | {cpu:.1f} | {cpu / max(wall, 1e-9):.2f} | {rb / 2**30:.2f} | {wb / 2**30:.2f} |"
            for label, (wall, cpu, rb, wb) in [*passes.items(), ("total", total)]]  # fmt: skip


def make_content(photo: Path, megapixels: float, out: Path) -> Path:
    """``photo`` enlarged to about ``megapixels`` MP, written as a JPEG (or a BigTIFF past JPEG's 65535 px), streamed."""
    import pyvips

    src = pyvips.Image.new_from_file(str(photo), access="sequential")
    scale = (megapixels * 1e6 / (src.width * src.height)) ** 0.5
    big = src.resize(scale, kernel="linear")
    if max(big.width, big.height) <= 65500:
        big.jpegsave(str(out.with_suffix(".jpg")), Q=90)
        return out.with_suffix(".jpg")
    big.tiffsave(str(out.with_suffix(".tif")), compression="jpeg", Q=90, tile=True, bigtiff=True)
    return out.with_suffix(".tif")


def read_seconds(path: Path) -> float:
    """Seconds a streamed read of ``path`` takes alone (decode and band conversion; no resize)."""
    from ultrastyle.io.stream import open_stream

    t0 = time.perf_counter()
    for _ in open_stream(path, max_pixels=10**11).bands():
        pass
    return time.perf_counter() - t0


class DiskWatch:
    """The most space taken on ``folder``'s disk while running (polled every 0.2 s)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.start, self.lowest = folder, shutil.disk_usage(folder).free, shutil.disk_usage(folder).free
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.lowest = min(self.lowest, shutil.disk_usage(self.folder).free)

    def __enter__(self) -> DiskWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    @property
    def used(self) -> int:
        return max(0, self.start - self.lowest)


def run(content: Path, style: Path, model: str, fmt: str, budget: str, work: Path) -> dict[str, float]:
    out = work / f"out_{fmt}"
    scratch = work / "scratch"
    scratch.mkdir(exist_ok=True)
    log = work / "passes.jsonl"
    argv = ["stylize", str(content), "--style", str(style), "-o", str(out), "--model", model, "--max-memory", budget,
            "--format", fmt, "--scratch", str(scratch), "--max-pixels", str(2 * 10**9)]  # fmt: skip  (1 GP > the 400 MP default)
    with DiskWatch(scratch) as disk:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _RUN, str(log), *argv], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{content.name} {fmt}: exit {r.returncode}\n{r.stderr[-2000:]}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out)
    passes, peak, cpu = read_passes(log)
    return {"wall": wall, "peak": peak, "cpu": cpu, "scratch": disk.used, "output": size, "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250,1000", help="content sizes in megapixels, comma-separated")
    ap.add_argument("--formats", default="tiff,dzi", help="output formats for every size")
    ap.add_argument("--png-at", default="250", help="sizes (MP) that also write a PNG; empty for none")
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--model", default=str(SHARED / "models/cd-wct-16x"))
    ap.add_argument("--photo", default=str(SHARED / "images/large/lomiri_seeding_by_Clements_Engelhardt.jpg"))
    ap.add_argument("--style", default=str(SHARED / "images/style/cd_style_in1.jpg"))
    ap.add_argument("--work", default=None, help="folder for contents, outputs and scratch (default: a temp folder)")
    args = ap.parse_args()

    from ultrastyle.runtime.memory import measure_baseline

    work = Path(args.work or tempfile.mkdtemp(prefix="ultrastyle-gigapixel-"))
    work.mkdir(parents=True, exist_ok=True)
    baseline = measure_baseline(args.model, "onnxruntime")
    budget = args.max_memory
    from ultrastyle.core.tile_memory import parse_bytes

    budget_bytes = parse_bytes(budget)  # as the CLI reads it
    print(f"baseline (onnxruntime, model open): {baseline / 2**20:.0f} MiB; --max-memory {budget}: "
          f"the rule is peak <= {(baseline + budget_bytes) / 2**30:.2f} GiB\n")  # fmt: skip
    # cpu/wall: the cores kept busy (2 at most here); lower where the run waits on the scratch disk.
    print("| content | format | wall s | s/MP | cpu/wall | peak RSS GiB | within rule | scratch GiB | output GB | read alone s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    png_at = {float(s) for s in args.png_at.split(",") if s}
    per_mp: dict[str, list[float]] = {}
    profiles: list[tuple[str, dict[str, list[float]]]] = []
    for mp in [float(s) for s in args.sizes.split(",")]:
        content = make_content(Path(args.photo), mp, work / f"content_{mp:g}mp")
        import pyvips

        head = pyvips.Image.new_from_file(str(content))
        actual = head.width * head.height / 1e6
        read_s = read_seconds(content)
        for fmt in args.formats.split(",") + (["png"] if mp in png_at else []):
            m = run(content, Path(args.style), args.model, fmt, budget, work)
            spm = m["wall"] / actual
            per_mp.setdefault(fmt, []).append(spm)
            profiles.append((f"{actual:.3g} MP, {fmt}", m["passes"]))
            ok = "yes" if m["peak"] <= baseline + budget_bytes else "NO"
            print(f"| {actual:.3g} MP ({head.width}x{head.height}) | {fmt} | {m['wall']:.0f} | {spm:.2f} | {m['cpu'] / m['wall']:.2f} | "
                  f"{m['peak'] / 2**30:.2f} | {ok} | {m['scratch'] / 2**30:.1f} | {m['output'] / 1e9:.2f} | {read_s:.1f} |", flush=True)  # fmt: skip
        content.unlink()
    for name, passes in profiles:  # where the time went: pass 1 "encode", pass 2 "decode", the rest "other"
        print(f"\n{name}, per pass:\n\n{PASS_HEADER}")
        print("\n".join(pass_rows(passes)))
    for fmt, v in per_mp.items():
        if len(v) > 1:
            print(f"\n{fmt}: s/MP at the largest size / at the smallest = {v[-1] / v[0]:.3f} (median s/MP {statistics.median(v):.2f})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
