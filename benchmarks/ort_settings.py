"""ONNX Runtime session settings, measured side by side: threads, graph optimisation, I/O binding, CPU arena.

Exports the CD 16x stage networks of stages 3 and 5 into a temporary bundle
(`export_bundle(load_cd_folder(...))`) and runs them through
`OnnxRuntimeRunner` -- the library's own inference path -- with one setting
changed at a time from what the runner does by default:

1. threads: ``intra_op_num_threads`` 1, 2 and ``os.cpu_count()`` (if
   different), plus the ORT default (0 = physical cores) and 2 threads with
   spin-waiting on (``session.intra_op.allow_spinning=1``, ORT's default; the
   runner turns it off, since the pipeline's own work between runs shares
   the cores);
2. graph optimisation level: ORT_DISABLE_ALL / ENABLE_BASIC / ENABLE_EXTENDED
   / ENABLE_ALL;
3. I/O binding of outputs into numpy buffers vs plain ``session.run``
   (``OnnxRuntimeRunner(io_binding=True/False)``), with torch tensors in and
   out as the pipeline uses them, and a check that both give the same output;

each as the median seconds per megapixel of encoder3+decoder_affine3 and of
encoder5+decoder_affine5 on one square tile (warm-up first, median of
``--repeats``), and

4. the CPU memory arena over a sequence of tile shapes, each configuration in
   a fresh subprocess: the arena with its default extend strategy
   (kNextPowerOfTwo, ONNX Runtime's default), no arena, an arena that
   extends by what is requested (kSameAsRequested -- the runner's default, a shared environment
   allocator registered with ``ort.create_and_register_allocator`` and used
   through ``session.use_env_allocators``), and the default arena shrunk after
   every run (run option ``memory.enable_memory_arena_shrinkage``). Each runs
   rounds of encoder3+decoder_affine3 over six tile shapes and records VmRSS
   (/proc/self/status) after every round; the table shows RSS after rounds
   1..3 and the last, growth from round 1 to 3 and to the last, the peak
   (VmHWM), RSS after ``malloc_trim(0)`` with the sessions alive (so what
   glibc was only caching is not counted) and again after they are destroyed,
   and the mean time per tile. Bounded means: no growth after round 1.

Settings the runner does not take as arguments (optimisation level, arena,
spinning) are applied by a subclass that edits the runner's SessionOptions
after ``activate_impl`` -- the same options object its sessions are built from.

Run from the repository root with ../shared beside it:

    .venv/bin/python benchmarks/ort_settings.py [--quick]

Full mode (1024 x 1024 tiles, median of 5, 5 arena rounds of tiles up to
1536 x 640) takes about 10-15 minutes on a 2-core machine; ``--quick`` (256 x
256 tiles, 2 repeats, 3 arena rounds of quarter-size shapes, no export
validation) about a minute. The quick numbers are a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _timing import median_seconds

from ultrastyle.export.bundle import export_bundle, read_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner

REPO = Path(__file__).resolve().parents[1]
STAGES = (3, 5)
ARENA_STAGE = 3
FULL_SHAPES = ((1024, 1024), (640, 1536), (1536, 640), (512, 512), (1008, 1024), (1024, 1008))
QUICK_SHAPES = ((256, 256), (160, 384), (384, 160), (128, 128), (240, 256), (256, 240))
OPT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
ARENA_CONFIGS = {
    "arena per session, default extend (kNextPowerOfTwo)": {"arena": True},
    "no arena (enable_cpu_mem_arena=False)": {"arena": False},
    "env arena, kSameAsRequested (use_env_allocators) -- the runner's default": {"arena": True, "env_same_as_requested": True},
    "arena + shrink after each run (run option)": {"arena": True, "shrink": True},
}


class _ShrinkingSession:
    """A session whose runs pass RunOptions that shrink the CPU arena afterwards."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self._sess = sess
        self._ro = ort.RunOptions()
        self._ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __getattr__(self, name: str):
        return getattr(self._sess, name)

    def run(self, outputs, feed, run_options=None):
        return self._sess.run(outputs, feed, self._ro)

    def run_with_iobinding(self, binding, run_options=None):
        return self._sess.run_with_iobinding(binding, self._ro)


class SettingsRunner(OnnxRuntimeRunner):
    """`OnnxRuntimeRunner` with one session setting changed: edits its SessionOptions after activate_impl."""

    def __init__(self, bundle, *, opt_level=None, arena=None, spinning=None, env_same_as_requested=False,
                 shrink=False, **kw) -> None:  # fmt: skip
        super().__init__(bundle, providers=["CPUExecutionProvider"], **kw)
        self.opt_level, self.arena, self.spinning = opt_level, arena, spinning
        self.env_same_as_requested, self.shrink = env_same_as_requested, shrink

    def activate_impl(self) -> None:
        super().activate_impl()
        opts = self._options
        if self.opt_level is not None:
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, self.opt_level)
        if self.arena is not None:
            opts.enable_cpu_mem_arena = self.arena
        if self.spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.env_same_as_requested:
            register_same_as_requested_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")

    def session(self, network: str):
        sess = super().session(network)
        return _ShrinkingSession(sess) if self.shrink else sess


_ENV_ARENA = False


def register_same_as_requested_arena() -> None:
    """Register a CPU arena allocator that extends by what is requested in ORT's (process-wide) environment."""
    global _ENV_ARENA
    if _ENV_ARENA:
        return
    mem_info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # arena_extend_strategy: 0 = kNextPowerOfTwo, 1 = kSameAsRequested; -1 elsewhere = ORT's default
    cfg = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1})
    ort.create_and_register_allocator(mem_info, cfg)
    _ENV_ARENA = True


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def stage_pass(runner, k: int, x: torch.Tensor, ab: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return runner.decode(k, runner.encode(k, x), *ab)


def affine(runner, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 (A, b) as fit_affine gives the pipeline; a near-identity so the decoder sees real features."""
    c = runner.arch.feature_channels(k)
    g = torch.Generator().manual_seed(k)
    return torch.eye(c, dtype=torch.float64) + 0.01 * torch.randn(c, c, generator=g, dtype=torch.float64), torch.zeros(
        c, dtype=torch.float64
    )


def measure(runner, tile: int, repeats: int) -> dict[int, float]:
    """Median seconds per megapixel of encoder{k}+decoder_affine{k} for each stage, on one tile."""
    x = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(0))
    mp = tile * tile / 1e6
    out = {}
    with runner:
        for k in STAGES:
            ab = affine(runner, k)
            out[k] = median_seconds(lambda: stage_pass(runner, k, x, ab), repeats) / mp
    return out


def table(title: str, rows: list[tuple[str, dict[int, float]]], note: str = "") -> None:
    print(f"## {title}\n")
    if note:
        print(note + "\n")
    base = rows[0][1]
    print("| setting | s/MP enc3+dec3 | s/MP enc5+dec5 | s/MP both | vs first row |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        both = sum(r.values())
        print(f"| {name} | {r[3]:.3f} | {r[5]:.3f} | {both:.3f} | {both / sum(base.values()):.2f}x |")
    print()


# ---------------------------------------------------------------------------------------------- arena worker


def arena_worker(bundle_path: str, config: str, shapes: list[tuple[int, int]], rounds: int, threads: int) -> None:
    """Runs in a fresh process: rounds of encoder+decoder_affine over ``shapes``; prints one JSON line."""
    torch.set_num_threads(1)
    runner = SettingsRunner(read_bundle(bundle_path), threads=threads, **ARENA_CONFIGS[config])
    k = ARENA_STAGE
    rss, times = [], []
    with runner:
        ab = affine(runner, k)
        runner.session(f"encoder{k}"), runner.session(f"decoder_affine{k}")
        rss_start = rss_kib()
        gen = torch.Generator().manual_seed(1)
        for _ in range(rounds):
            for h, w in shapes:
                x = torch.rand(1, 3, h, w, generator=gen)
                t0 = time.perf_counter()
                y = stage_pass(runner, k, x, ab)
                times.append((time.perf_counter() - t0) / (h * w / 1e6))
                assert y.shape == (1, 3, h, w), y.shape
                del x, y
            rss.append(rss_kib())
        hwm = rss_kib("VmHWM")
        trimmed = _trimmed_rss()  # sessions (and their arenas) still alive
    closed = _trimmed_rss()  # sessions destroyed by deactivate
    print(json.dumps({"rss_start": rss_start, "rss": rss, "hwm": hwm, "trimmed": trimmed, "closed": closed,
                      "s_per_mp": statistics.mean(times)}))  # fmt: skip


def _trimmed_rss() -> int:
    """VmRSS after glibc hands its free heap back to the kernel (malloc_trim(0)); -1 without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return -1
    return rss_kib()


def arena_table(bundle_path: Path, shapes, rounds: int, threads: int) -> None:
    results = {}
    for config in ARENA_CONFIGS:
        cmd = [sys.executable, __file__, "--arena-worker", config, "--bundle", str(bundle_path),
               "--shapes", json.dumps(shapes), "--rounds", str(rounds), "--threads", str(threads)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[config] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        else:
            results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = lambda kib: f"{kib / 1024:.0f}"  # noqa: E731
    shape_s = ", ".join(f"{h}x{w}" for h, w in shapes)
    print(f"## 4. CPU arena over varied tile shapes (encoder{ARENA_STAGE}+decoder_affine{ARENA_STAGE}, "
          f"fresh process each)\n")  # fmt: skip
    print(f"{rounds} rounds of {len(shapes)} tiles ({shape_s}), {rounds * len(shapes)} tiles; RSS in MiB after "
          f"loading both sessions and after each round; 'trimmed' = RSS after the last round and malloc_trim(0), "
          f"sessions alive; 'closed' = the same after the sessions are destroyed (an env allocator outlives "
          f"them).\n")  # fmt: skip
    print("| arena setting | RSS start | round 1 | round 2 | round 3 | last round | growth r1->r3 | growth r1->last "
          "| peak (VmHWM) | trimmed | closed | s/MP per tile |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config, r in results.items():
        if isinstance(r, str):
            print(f"| {config} | failed: {r} ||||||||||")
            continue
        rs = r["rss"]
        print(f"| {config} | {mib(r['rss_start'])} | {mib(rs[0])} | {mib(rs[1])} | {mib(rs[2])} | {mib(rs[-1])} "
              f"| {(rs[2] - rs[0]) / 1024:+.0f} | {(rs[-1] - rs[0]) / 1024:+.0f} | {mib(r['hwm'])} "
              f"| {mib(r['trimmed'])} | {mib(r['closed'])} | {r['s_per_mp']:.3f} |")  # fmt: skip
    print()


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO.parent / "shared/models/cd-wct-16x")
    ap.add_argument("--quick", action="store_true", help="256x256 tiles, 2 repeats, 3 arena rounds (~1 minute)")
    ap.add_argument("--tile", type=int, default=None, help="square tile side (default 1024; 256 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="median of this many runs (default 5; 2 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="arena rounds over the shapes (default 5; 3 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the tables that do not vary them")
    ap.add_argument("--arena-worker", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arena_worker:
        shapes = [tuple(s) for s in json.loads(args.shapes)]
        arena_worker(args.bundle, args.arena_worker, shapes, args.rounds, args.threads)
        return
    tile = args.tile or (256 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 5)
    rounds = max(3, args.rounds or (3 if args.quick else 5))
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    torch.set_num_threads(args.threads)  # torch only wraps/converts here; ORT does the work
    cpus = os.cpu_count() or 1

    t_start = time.perf_counter()
    model = load_cd_folder(args.models, stages=STAGES)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(model, Path(tmp) / "bundle", spec=ExportSpec(stages=STAGES), validate=not args.quick)
        del model
        print(f"# ONNX Runtime session settings{' (--quick smoke run)' if args.quick else ''}\n")
        print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
              f"{args.threads} threads unless varied, os.cpu_count() {cpus}, "
              f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}; "
              f"{tile}x{tile} tile, warm-up then median of {repeats}; CD 16x stages {STAGES}, "
              f"A and b float64 as from fit_affine\n")  # fmt: skip

        thread_counts = sorted({1, 2, cpus})
        rows = [(f"intra_op_num_threads={t}", measure(SettingsRunner(bundle, threads=t), tile, repeats))
                for t in thread_counts]  # fmt: skip
        rows.append(("ORT default (0 = physical cores)", measure(SettingsRunner(bundle, threads=0), tile, repeats)))
        rows.append(("2 threads, allow_spinning=1 (the runner: 0)",
                     measure(SettingsRunner(bundle, threads=2, spinning=True), tile, repeats)))  # fmt: skip
        table("1. Threads", rows, "ORT_ENABLE_ALL, I/O binding (the runner's defaults).")

        rows = [(lvl, measure(SettingsRunner(bundle, threads=args.threads, opt_level=lvl), tile, repeats))
                for lvl in OPT_LEVELS]  # fmt: skip
        table("2. Graph optimisation level", rows, f"{args.threads} threads, I/O binding.")

        rows = []
        outs = {}
        for io in (True, False):
            r = SettingsRunner(bundle, threads=args.threads, io_binding=io)
            rows.append((f"io_binding={io}" + (" (runner default)" if io else " (session.run)"),
                         measure(r, tile, repeats)))  # fmt: skip
            x = torch.rand(1, 3, tile, tile, generator=torch.Generator().manual_seed(0))
            with r:
                outs[io] = {k: stage_pass(r, k, x, affine(r, k)) for k in STAGES}
        diff = max(float((outs[True][k] - outs[False][k]).abs().max()) for k in STAGES)
        table("3. I/O binding", rows, f"{args.threads} threads, ORT_ENABLE_ALL; max |difference| of the outputs "
              f"between the two: {diff:.2e}.")  # fmt: skip

        arena_table(bundle.path, shapes, rounds, args.threads)
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
