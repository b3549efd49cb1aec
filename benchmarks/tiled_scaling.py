"""Tiled vs whole-image stylization: wall time, seconds per megapixel and peak RSS by image size.

What it measures
----------------
For each size (megapixels) the source photo is resized (PIL, LANCZOS, aspect
ratio kept; sizes above the photo's are upscaled) and saved as a JPEG
(quality 95) or PNG in a work folder. All inputs are built before anything
is timed. Then, for each path, one FRESH Python process runs the real
end-to-end job through the library:

    run_batch(load_cd_folder(models), plan_pairs([content], [style], outdir, "png"),
              StylizeOptions(style_size=1024, levels=..., tiling=TilingOptions(max_memory, scratch_dir)))

Paths: ``whole`` is the whole-image PyTorch reference (``tiling=None``);
``tiled`` is the tiled path on the PyTorch runner; ``tiled-ort`` the tiled
path on the ONNX Runtime runner (the bundle is exported, and the sessions
created, before timing, like loading the models). "time / whole's" divides a
tiled path's wall time by the whole-image path's at the same size.

``tiling=None`` is the whole-image reference path. The wall time is taken
around ``run_batch`` only, so it includes reading the content, the style
statistics (style resized to ``--style-size``; a fixed cost of roughly 1 MP
of encoders, which dominates the smallest sizes), the 5-stage cascade and
writing the output PNG, but not importing torch or loading the models.
Peak RSS is the worker's high-water mark ``VmHWM`` from /proc/self/status at
the end (as reported by the OS, so memory-mapped canvas pages that were
resident count too; not ``ru_maxrss``, which Linux carries over from the parent
across fork + exec); the baseline is the same counter after importing torch
and loading the models, and "over base" is the difference. A sampler thread also reads
VmRSS every 20 ms and remembers which phase (content tile pass of a stage,
"load+style" before the first tile, "save" after the last) the highest
sample fell in. A worker that dies (killed by the OOM killer, say) is
reported as such in the table, with the peak RSS the kernel recorded for
it, and the benchmark goes on.

Columns: "cpu s" is the worker's user + system CPU time over the same span
(on 2 cores about 2x wall when nothing else runs); "load" is the 1-minute
load average when the worker started: above ~0.5 another process was
competing for the CPUs and the wall times are not comparable. "peak phase"
is where the RSS maximum was reached, which is not always what allocated it:
every worker keeps freed heap memory for reuse as the command line does
(`ultrastyle.runtime.memory.keep_freed_memory`: large tensors come from the
heap and stay there until the tiled pipeline trims it), so RSS ratchets up
within a pass. ``--system-malloc`` runs the workers with glibc's defaults
instead (every tensor above 32 MB freshly mapped and unmapped), to see what
that setting buys. The tiled PyTorch worker also asks PyTorch for huge
pages (`memory.use_huge_pages`, as ``stylize --backend torch`` does for tiled
runs: trimmed pages fault back in 2 MB at a time); ``--no-huge-pages``
leaves them out.
"tiles" counts encode + decode tiles over all stages.
Environment variables reach the workers.

``--compare`` loads the two output PNGs wherever both paths ran and prints
the largest absolute uint8 difference (the tiled path is exact: expect 0 or 1).

How to run
----------
From the repository root, with ``../shared`` beside it::

    .venv/bin/python benchmarks/tiled_scaling.py                  # 2, 8, 16, 40, 100 MP
    .venv/bin/python benchmarks/tiled_scaling.py --quick --compare  # 0.5 and 2 MP smoke run
    .venv/bin/python benchmarks/tiled_scaling.py --sizes 40 --paths tiled --max-memory 512MB

How long it takes (2-core machine, 24 GiB)
------------------------------------------
``--quick``: about 1-2 minutes. The full run does ~166 MP through each
tiled path and 26 MP through the whole-image path (skipped above
``--whole-max-mp``: it needs about 0.6 GB per MP), at roughly 2.5-3.5 s/MP
each: about 20 minutes (run U, 2026-11-22: 18.5), plus a minute to build
the inputs. Run it on an otherwise idle machine; the
timings are per process and CPU contention shows up directly in them.

The work folder (inputs, outputs) is created under ``--scratch`` (default:
the system temp folder), which is also where the library puts its
disk-backed canvases; it is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
DEFAULT_SOURCE = SHARED / "images" / "large" / "lomiri_seeding_by_Clements_Engelhardt.jpg"
DEFAULT_STYLE = SHARED / "images" / "style" / "cd_style_in1.jpg"
DEFAULT_MODELS = SHARED / "models" / "cd-wct-16x"
MARKER = "TILED_SCALING_RESULT "
# whole: the whole-image PyTorch reference; tiled: tiled, PyTorch runner; tiled-ort: tiled, ONNX Runtime runner
PATHS = ("whole", "tiled", "tiled-ort")
GiB = 2**30


def _resolve(p: str | Path) -> Path:
    """Relative paths are taken relative to the repository root (so ``../shared/...`` works from anywhere)."""
    p = Path(p).expanduser()
    return (p if p.is_absolute() else REPO / p).resolve()


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _paths(text: str) -> list[str]:
    vals = [t for t in text.replace(" ", "").split(",") if t]
    bad = [v for v in vals if v not in PATHS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"paths are some of {', '.join(PATHS)}; got {text!r}")
    return vals


def _mp_label(mp: float) -> str:
    return f"{mp:g}"


# --------------------------------------------------------------------------- worker


def _vmrss() -> int:
    """Current resident set size in bytes (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _maxrss() -> int:
    """Peak RSS of this process in bytes: VmHWM (Linux), else ru_maxrss.

    Not ru_maxrss on Linux: it carries over across fork + exec, so a worker
    would start at the parent's peak (the parent builds the 100 MP inputs).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class _Sampler:
    """Samples VmRSS in a thread; remembers the phase label at the highest sample."""

    def __init__(self, interval: float = 0.02) -> None:
        self.phase = "load+style"
        self.peak, self.peak_phase = 0, self.phase
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _vmrss()
            if rss > self.peak:
                self.peak, self.peak_phase = rss, self.phase
            self._stop.wait(self._interval)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns the JSON-able result."""
    import torch

    from ultrastyle.models.pretrained import load_cd_folder
    from ultrastyle.runtime.batch import StylizeOptions, run_batch
    from ultrastyle.runtime.pairs import plan_pairs
    from ultrastyle.core.tile_memory import parse_bytes
    from ultrastyle.runtime.memory import keep_freed_memory, use_huge_pages
    from ultrastyle.core.plan import TilingOptions
    from ultrastyle.runtime.tiled import plan_image_for

    huge_pages = False
    if not spec.get("system_malloc"):
        keep_freed_memory()  # as the command line does, for every path
        if spec["path"] == "tiled" and not spec.get("no_huge_pages"):
            huge_pages = use_huge_pages()  # as `stylize --backend torch` does for tiled runs, before the first tensor
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    levels = tuple(spec["levels"])
    model = load_cd_folder(spec["models"], stages=tuple(sorted(set(levels))))
    runner = None
    if spec["path"] == "tiled-ort":
        from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(spec["bundle"], threads=spec.get("threads") or 0).activate()
        for k in set(levels):  # sessions are created before timing, like model loading
            runner.session(f"encoder{k}")
            runner.session(f"decoder_affine{k}")
        model = runner
    else:
        from ultrastyle.runtime.backends.torch_backend import TorchRunner

        # As `stylize --backend torch` runs it: the runner reads the heap factor once, now that the heap is set up.
        runner = model = TorchRunner(model).activate()
    baseline, rss_loaded = _maxrss(), _vmrss()

    content, style, outdir = Path(spec["content"]), Path(spec["style"]), Path(spec["outdir"])
    tiling = None
    plan_info: list[dict] = []
    if spec["path"] in ("tiled", "tiled-ort"):
        budget = parse_bytes(spec["max_memory"])
        scratch = Path(spec["scratch"]) if spec.get("scratch") else None
        tiling = TilingOptions(max_memory=budget, scratch_dir=scratch, uniform_tiles=spec.get("uniform_tiles"), overlap_io=spec.get("overlap_io"))
        h, w = spec["height"], spec["width"]
        for p in plan_image_for(model, h, w, levels, tiling).stages:  # as stylize_tiled plans, with the runner's traits
            plan_info.append({"stage": p.stage, "encode_tiles": len(p.encode_tiles()), "decode_tiles": len(p.decode_tiles()),
                              "encode_core": p.encode_core, "decode_core": p.decode_core, "cache": p.cache})  # fmt: skip
    options = StylizeOptions(style_size=spec["style_size"], levels=levels, tiling=tiling)
    pairs = plan_pairs([content], [style], outdir, "png")

    with _Sampler() as sampler:
        last = levels[-1]

        def on_tile(what: str, done: int, total: int) -> None:
            sampler.phase = what
            if what == f"stage {last} decode" and done == total:
                sampler.phase = "save"

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        summary = run_batch(model, pairs, options, on_tile=on_tile if tiling is not None else None)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    result = summary.results[0]
    return {
        "status": result.status,
        "error": result.error,
        "wall_s": wall,
        "pair_s": result.seconds,
        "cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime),
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        "load_before": load,
        "megapixels": result.megapixels,
        "output": str(pairs[0].output),
        "baseline_rss": baseline,
        "rss_after_load": rss_loaded,
        "peak_rss": _maxrss(),
        "sampled_peak_rss": sampler.peak,
        "peak_phase": sampler.peak_phase if tiling is not None else "",
        "plan": plan_info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "huge_pages": huge_pages,
    }


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    out = worker(spec)
    print(MARKER + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- driver


def target_size(src_w: int, src_h: int, mp: float) -> tuple[int, int]:
    """(W, H) with the source's aspect ratio and about ``mp`` megapixels."""
    s = math.sqrt(mp * 1e6 / (src_w * src_h))
    return max(1, round(src_w * s)), max(1, round(src_h * s))


def build_inputs(source: Path, sizes: list[float], folder: Path, fmt: str) -> dict[float, tuple[Path, int, int]]:
    """The resized inputs, built before any timing: {mp: (path, W, H)}."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # our own upscaled inputs go past PIL's 89 MP guard
    out = {}
    with Image.open(source) as im:
        im = im.convert("RGB")
        for mp in sizes:
            w, h = target_size(im.width, im.height, mp)
            path = folder / f"content_{_mp_label(mp).replace('.', 'p')}mp.{fmt}"
            t0 = time.perf_counter()
            resized = im.resize((w, h), Image.Resampling.LANCZOS) if (w, h) != im.size else im.copy()
            if fmt == "jpg":
                resized.save(path, "JPEG", quality=95)
            else:
                resized.save(path, "PNG", compress_level=1)
            del resized
            _log(f"input {_mp_label(mp)} MP: {w}x{h} -> {path.name} ({time.perf_counter() - t0:.1f} s)")
            out[mp] = (path, w, h)
    return out


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_worker(spec: dict, timeout: float | None) -> dict:
    """Run one measurement in a fresh process; a dead worker becomes a result with status 'died'."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        t0 = time.perf_counter()
        try:
            # wait4, not wait: it also gives the child's own rusage (peak RSS even if it was killed).
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    kernel_peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            res = json.loads(line[len(MARKER) :])
            res["process_s"] = elapsed
            return res
    rc = proc.returncode
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = f"killed by {name}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
        if timeout and elapsed >= timeout:
            why = f"timed out after {timeout:g} s"
    else:
        why = f"exited with status {rc}"
    tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-1:] or [""]
    return {"status": "died", "error": f"{why}; {tail[0]}".rstrip("; "), "peak_rss": kernel_peak,
            "process_s": elapsed, "stderr_tail": stderr[-4000:]}  # fmt: skip


def max_abs_diff(a_path: str, b_path: str, band: int = 1024) -> int:
    """Largest |a - b| over two same-size 8-bit images, compared band by band."""
    import numpy as np
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(a_path) as a, Image.open(b_path) as b:
        if a.size != b.size:
            raise ValueError(f"sizes differ: {a.size} vs {b.size}")
        a, b = a.convert("RGB"), b.convert("RGB")
        worst = 0
        for r in range(0, a.height, band):
            box = (0, r, a.width, min(a.height, r + band))
            da = np.asarray(a.crop(box), dtype=np.int16)
            db = np.asarray(b.crop(box), dtype=np.int16)
            worst = max(worst, int(np.abs(da - db).max()))
    return worst


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / GiB:.2f}"


def print_report(rows: list[dict], args: argparse.Namespace, env: dict) -> None:
    print()
    print(f"# tiled_scaling: {env['date']}")
    print()
    print(f"- torch {env.get('torch', '?')}, {env.get('threads', '?')} threads; {env['cpus']} CPUs "
          f"({env['cpu_model']}); {env['mem_total']}; Python {platform.python_version()}; ultrastyle {env['git']}")  # fmt: skip
    print(f"- model {args.models.name}, levels {args.levels}, style {args.style.name} at {args.style_size} px; "
          f"tiled: --max-memory {args.max_memory}, scratch {args.scratch or tempfile.gettempdir()}")  # fmt: skip
    print(f"- source {args.source.name}, inputs as {args.input_format.upper()}; output PNG; "
          "wall s = run_batch (read + style stats + cascade + write)")  # fmt: skip
    print()
    cols = ["size (MP, WxH)", "path", "wall s", "s/MP", "cpu s", "load", "peak RSS GiB", "baseline GiB", "over base GiB",
            "peak phase", "tiles", "time / whole's"]  # fmt: skip
    if args.compare:
        cols.append("max abs diff (uint8)")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        size = f"{_mp_label(r['mp'])} ({r['width']}x{r['height']})"
        res = r.get("result")
        if res is None:
            cells = [size, r["path"], r["note"]] + [""] * 9
        elif res["status"] != "done":
            msg = res.get("error") or res["status"]
            cells = [size, r["path"], f"{res['status'].upper()}: {msg}", "", "", "", _gib(res.get("peak_rss"))] + [""] * 5
        else:
            mp = r["width"] * r["height"] / 1e6
            tiles = sum(p["encode_tiles"] + p["decode_tiles"] for p in res.get("plan", [])) or ""
            load = "" if res.get("load_before") is None else f"{res['load_before']:.1f}"
            cells = [size, r["path"], f"{res['wall_s']:.1f}", f"{res['wall_s'] / mp:.2f}", f"{res['cpu_s']:.0f}", load, _gib(res["peak_rss"]),
                     _gib(res["baseline_rss"]), _gib(res["peak_rss"] - res["baseline_rss"]), res.get("peak_phase", ""),
                     str(tiles), r.get("ratio", "")]  # fmt: skip
        if args.compare:
            cells.append(r.get("diff", ""))
        print("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    print()


def _env() -> dict:
    cpu_model, mem = "?", "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
            mem = f"{kb / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "cpus": cpus,
            "cpu_model": cpu_model, "mem_total": mem, "git": rev or "?"}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_floats, default=None, help="megapixels, comma-separated (default 2,8,16,40,100)")
    ap.add_argument("--quick", action="store_true", help="smoke run: sizes 0.5,2 (unless --sizes is given)")
    ap.add_argument("--max-memory", default="1GB", help="TilingOptions.max_memory for the tiled path (default 1GB)")
    ap.add_argument("--paths", type=_paths, default=list(PATHS), help=f"some of {','.join(PATHS)} (default all)")
    ap.add_argument("--whole-max-mp", type=float, default=16.0,
                    help="skip the whole-image path above this many MP (it needs ~0.6 GB/MP with freed memory kept; default 16)")  # fmt: skip
    ap.add_argument("--source", type=_resolve, default=DEFAULT_SOURCE, help="photo resized to each size")
    ap.add_argument("--style", type=_resolve, default=DEFAULT_STYLE)
    ap.add_argument("--style-size", type=int, default=1024, help="style long side in px (default 1024)")
    ap.add_argument("--models", type=_resolve, default=DEFAULT_MODELS, help="folder of CD {k}SE.pth/{k}SD.pth")
    ap.add_argument("--scratch", type=_resolve, default=None,
                    help="folder for the work files and the disk-backed canvases (default: system temp)")  # fmt: skip
    ap.add_argument("--levels", default="5,4,3,2,1")
    ap.add_argument("--input-format", choices=("jpg", "png"), default="jpg", help="how inputs are stored (default jpg q95)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers (0: torch's default)")
    ap.add_argument("--timeout", type=float, default=0, help="kill a worker after this many seconds (0: never)")
    ap.add_argument("--uniform-tiles", choices=("auto", "on", "off"), default="auto",
                    help="one tile shape per pass (auto: the runner's preference: on for ONNX Runtime, off for PyTorch)")
    ap.add_argument("--overlap-io", choices=("auto", "on", "off"), default="auto",
                    help="tile reads/writes of host canvases on worker threads (auto: the runner's: on where a GPU computes)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc as it is (the CLI's keep_freed_memory is applied otherwise)")
    ap.add_argument("--no-huge-pages", action="store_true",
                    help="tiled PyTorch without huge pages (the CLI's use_huge_pages is applied otherwise)")  # fmt: skip
    ap.add_argument("--compare", action="store_true", help="max |tiled - whole| of the output PNGs where both ran")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (inputs, outputs)")
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = [0.5, 2.0] if args.quick else [2.0, 8.0, 16.0, 40.0, 100.0]
    try:
        args.level_list = [int(t) for t in args.levels.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--levels: expected comma-separated stages, got {args.levels!r}")
    for name in ("source", "style"):
        if not getattr(args, name).is_file():
            ap.error(f"--{name}: no such file: {getattr(args, name)}")
    if not args.models.is_dir():
        ap.error(f"--models: no such folder: {args.models}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1])
    args = parse_args(argv)
    env = _env()
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tiled-scaling-", dir=args.scratch))
    _log(f"work folder {work}")
    rows: list[dict] = []
    try:
        inputs = build_inputs(args.source, args.sizes, work, args.input_format)
        bundle = None
        if "tiled-ort" in args.paths:  # exported once, before anything is timed
            from ultrastyle.export.bundle import export_bundle
            from ultrastyle.export.spec import ExportSpec
            from ultrastyle.models.pretrained import load_cd_folder

            stages = tuple(sorted(set(args.level_list)))
            bundle = export_bundle(load_cd_folder(args.models, stages=stages), work / "bundle", spec=ExportSpec(stages=stages)).path
            _log(f"exported the ONNX bundle to {bundle}")
        for mp in args.sizes:
            path, w, h = inputs[mp]
            by_path: dict[str, dict] = {}
            for which in args.paths:
                row = {"mp": mp, "width": w, "height": h, "path": which}
                rows.append(row)
                if which == "whole" and w * h / 1e6 > args.whole_max_mp:
                    row["note"] = f"skipped (> --whole-max-mp {args.whole_max_mp:g})"
                    continue
                spec = {"path": which, "content": str(path), "style": str(args.style), "models": str(args.models),
                        "outdir": str(work / f"out-{which}"), "style_size": args.style_size, "levels": args.level_list,
                        "max_memory": args.max_memory, "scratch": str(args.scratch) if args.scratch else None,
                        "uniform_tiles": {"auto": None, "on": True, "off": False}[args.uniform_tiles],
                        "overlap_io": {"auto": None, "on": True, "off": False}[args.overlap_io],
                        "system_malloc": args.system_malloc,
                        "no_huge_pages": args.no_huge_pages,
                        "height": h, "width": w, "threads": args.threads, "bundle": str(bundle) if bundle else None}  # fmt: skip
                _log(f"{_mp_label(mp)} MP {which}: running")
                res = run_worker(spec, args.timeout or None)
                row["result"] = res
                if res["status"] == "done":
                    by_path[which] = res
                    _log(f"{_mp_label(mp)} MP {which}: {res['wall_s']:.1f} s, {res['wall_s'] / (w * h / 1e6):.2f} s/MP, "
                         f"peak RSS {_gib(res['peak_rss'])} GiB (baseline {_gib(res['baseline_rss'])})")  # fmt: skip
                    env.setdefault("torch", res["torch"])
                    env.setdefault("threads", res["threads"])
                else:
                    _log(f"{_mp_label(mp)} MP {which}: {res['status']}: {res.get('error')}")
            for which in ("tiled", "tiled-ort"):
                if which not in by_path or "whole" not in by_path:
                    continue
                tiled_row = next(r for r in rows if r["mp"] == mp and r["path"] == which)
                tiled_row["ratio"] = f"{by_path[which]['wall_s'] / by_path['whole']['wall_s']:.2f}"
                if args.compare:
                    d = max_abs_diff(by_path[which]["output"], by_path["whole"]["output"])
                    tiled_row["diff"] = str(d)
                    _log(f"{_mp_label(mp)} MP: max |{which} - whole| = {d}")
            for res in by_path.values():  # outputs of 100 MP are hundreds of MB: drop them once compared
                if not args.keep:
                    Path(res["output"]).unlink(missing_ok=True)
    finally:
        if args.keep:
            _log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_report(rows, args, env)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
