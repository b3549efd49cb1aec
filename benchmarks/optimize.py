"""Optimization-based stylization (`ultrastyle optimize`): solvers, whole vs tiled, a large image, the contact sheet.

Every measured run is one FRESH Python process (``worker``) that loads the
loss network, runs `ultrastyle.optimization.run.Optimizer.run` and prints one
JSON line: the loss after every iteration with its time, the tiles per
evaluation, wall time and peak RSS (``VmHWM`` from /proc/self/status: as the
OS reports it, mapped canvas pages included), and the baseline RSS after
loading (interpreter, torch, the network). Times on this shared 2-core
machine are absolute times of a loaded machine: compare columns measured in
one run, not across runs.

    python benchmarks/optimize.py solvers     # L-BFGS vs Adam, same pairs, same iterations
    python benchmarks/optimize.py tiling      # whole image vs tiled, same iterations: final losses, s/iter/MP, RSS
    python benchmarks/optimize.py divergence --tile 64   # per iteration: where float32 rounding starts to tell
    python benchmarks/optimize.py large       # >= 16 MP within max_memory 1GB (slow: about half an hour here)
    python benchmarks/optimize.py sheet       # docs/optimize_contact_sheet.jpg: content | style | WCT | optimized
    python benchmarks/optimize.py all

Pairs are held out: the style weight was chosen on cd_content_in1 x
cd_style_in1 (docs/optimize.md), which no table here uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ULTRASTYLE_SHARED", REPO.parent / "shared"))
MODEL = SHARED / "models" / "cd-wct-16x"
IMAGES = SHARED / "images"
PAIRS = [
    ("content/cd_content_in2.jpg", "style/gcompris_painting_GreatWave.png"),
    ("content/cd_content_in4.jpg", "style/cd_style_in3.jpg"),
]
LARGE = ("large/lomiri_sunset_by_Aitzol_Berasategi.jpg", "style/cd_style_in2.jpg")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> None:
    """One run; prints a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    from ultrastyle.optimization.run import Optimizer
    from ultrastyle.runtime.memory import keep_freed_memory

    keep_freed_memory()  # the heap as the command line sets it up

    opt = Optimizer(MODEL)
    base = _status("VmRSS")
    log: list[tuple[int, int, float, float, float, float]] = []

    def on_progress(e) -> None:
        log.append((e.scale, e.iteration, e.value.total, e.value.content, e.value.style_total, e.seconds))
        print(json.dumps({"progress": log[-1], "tiles": e.tiles}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    tiles = []
    opt.run(args.content, args.style, output=args.output, iterations=args.iterations, solver=args.solver,
            max_memory=None if args.max_memory == "none" else args.max_memory, tile=args.tile, init=args.init,
            content_size=args.content_size, scales=args.scales, lr=args.lr, scratch=args.scratch,
            on_progress=lambda e: (on_progress(e), tiles.append(e.tiles)))  # fmt: skip
    print(json.dumps({
        "log": log, "seconds": time.perf_counter() - t0, "hwm": _status("VmHWM"), "base": base,
        "tiles": tiles[-1] if tiles else 0, "load": os.getloadavg()[0],
    }))  # fmt: skip


def run(content: str, style: str, *, size: int, iterations: int, solver: str = "lbfgs", max_memory: str = "none",
        tile: int | None = None, init: str = "content", threads: int = 1, output: str | None = None, scales: str = "full",
        lr: float = 0.01, scratch: str | None = None) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "worker", str(IMAGES / content), str(IMAGES / style), "--content-size", str(size),
           "--iterations", str(iterations), "--solver", solver, "--max-memory", max_memory, "--init", init,
           "--threads", str(threads), "--scales", scales, "--lr", str(lr)]  # fmt: skip
    if tile:
        cmd += ["--tile", str(tile)]
    if output:
        cmd += ["--output", output]
    if scratch:
        cmd += ["--scratch", scratch]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mp(content: str, size: int) -> float:
    from PIL import Image

    w, h = Image.open(IMAGES / content).size
    f = size / max(w, h) if size else 1
    return round(w * f) * round(h * f) / 1e6


def solvers(iterations: int, size: int) -> None:
    print(f"\n## L-BFGS vs Adam: {iterations} iterations, content long side {size} px, whole image, 1 thread\n")
    print("| pair | solver | loss at 1 | at 5 | at 10 | last | last / L-BFGS's | s/iter | evaluations/iter |")
    print("|---|---|---|---|---|---|---|---|---|")
    for content, style in PAIRS:
        finals = {}
        for solver, lr in (("lbfgs", 0.01), ("adam", 0.01), ("adam", 0.03)):
            r = run(content, style, size=size, iterations=iterations, solver=solver, lr=lr)
            if "error" in r:
                print(f"| {Path(content).stem} | {solver} | failed: {r['error']} |")
                continue
            losses = [e[2] for e in r["log"]]
            finals[(solver, lr)] = losses[-1]
            ref = finals.get(("lbfgs", 0.01), losses[-1])
            per = (r["log"][-1][5] - r["log"][0][5]) / max(1, len(losses) - 1)
            name = solver if solver == "lbfgs" else f"adam lr {lr}"
            evals = "2 (1 + line search)" if solver == "lbfgs" else "1"
            print(f"| {Path(content).stem} x {Path(style).stem} | {name} | {losses[0]:.4g} | {losses[min(4, len(losses) - 1)]:.4g} | "
                  f"{losses[min(9, len(losses) - 1)]:.4g} | {losses[-1]:.4g} | {losses[-1] / ref:.2f} | {per:.2f} | {evals} |", flush=True)


def tiling(iterations: int, size: int, tile: int) -> None:
    print(f"\n## Whole image vs tiled: L-BFGS, {iterations} iterations, long side {size} px, 1 thread (loaded machine)\n")
    print("| pair | MP | path | tiles | final loss | tiled / whole | s/iter/MP | peak RSS | over base |")
    print("|---|---|---|---|---|---|---|---|---|")
    for content, style in PAIRS:
        mp = _mp(content, size)
        whole = None
        for path, kw in (("whole", {}), (f"tiled (tile {tile})", {"tile": tile, "max_memory": "1GB"})):
            r = run(content, style, size=size, iterations=iterations, **kw)
            if "error" in r:
                print(f"| {Path(content).stem} | {mp:.2f} | {path} | failed: {r['error']} |")
                continue
            final = r["log"][-1][2]
            whole = whole or final
            per = (r["log"][-1][5] - r["log"][0][5]) / max(1, len(r["log"]) - 1) / mp
            print(f"| {Path(content).stem} x {Path(style).stem} | {mp:.2f} | {path} | {r['tiles']} | {final:.6g} | "
                  f"{final / whole:.6f} | {per:.1f} | {r['hwm'] / 2**30:.2f} GiB | {(r['hwm'] - r['base']) / 2**30:.2f} GiB |", flush=True)


def divergence(iterations: int, size: int, tile: int) -> None:
    """Per iteration, tiled over whole-image loss: where float32 rounding starts to tell."""
    content, style = PAIRS[1]
    whole = run(content, style, size=size, iterations=iterations)
    tiled = run(content, style, size=size, iterations=iterations, tile=tile, max_memory="1GB")
    if "error" in whole or "error" in tiled:
        print(f"failed: {whole.get('error') or tiled.get('error')}")
        return
    print(f"\n## Tiled ({tiled['tiles']} tiles of {tile} px) / whole-image loss per iteration, {Path(content).stem} x {Path(style).stem}, {size} px\n")
    print("| iteration | " + " | ".join(str(i + 1) for i in range(len(whole["log"]))) + " |")
    print("|---|" + "---|" * len(whole["log"]))
    print("| tiled / whole − 1 | " + " | ".join(f"{t[2] / w[2] - 1:.1e}" for w, t in zip(whole["log"], tiled["log"])) + " |")


def large(megapixels: float, iterations: int, threads: int) -> None:
    from PIL import Image

    content, style = LARGE
    w, h = Image.open(IMAGES / content).size
    side = round(max(w, h) * (megapixels * 1e6 / (w * h)) ** 0.5)
    mp = _mp(content, side)
    print(f"\n## {mp:.1f} MP ({content} upscaled to a {side}-px long side), max_memory 1GB, L-BFGS, {iterations} iteration(s), {threads} thread(s)\n")
    with tempfile.TemporaryDirectory(prefix="ultrastyle-bench-") as tmp:
        r = run(content, style, size=side, iterations=iterations, max_memory="1GB", threads=threads,
                output=str(Path(tmp) / "large.jpg"), scratch=tmp)  # fmt: skip
    if "error" in r:
        print(f"failed: {r['error']}")
        return
    log = r["log"]
    print("| MP | tiles/evaluation | wall (incl. targets, output) | first iteration | s/iter/MP | peak RSS | over base | final loss |")
    print("|---|---|---|---|---|---|---|---|")
    per = log[-1][5] / len(log) / mp
    print(f"| {mp:.1f} | {r['tiles']} | {r['seconds']:.0f} s | {log[0][5]:.0f} s | {per:.1f} (first iteration included) | "
          f"{r['hwm'] / 2**30:.2f} GiB | {(r['hwm'] - r['base']) / 2**30:.2f} GiB | {log[-1][2]:.4g} |")


def sheet(iterations: int, size: int, path: Path) -> None:
    """content | style | WCT (ultrastyle stylize) | optimized, one row per held-out pair."""
    import numpy as np
    from PIL import Image

    import ultrastyle

    rows = []
    cell = 256
    with tempfile.TemporaryDirectory() as tmp:
        for content, style in PAIRS:
            out = str(Path(tmp) / "opt.png")
            r = run(content, style, size=size, iterations=iterations, output=out, threads=2)
            if "error" in r:
                print(f"sheet: {content} failed: {r['error']}")
                continue
            c = Image.open(IMAGES / content).convert("RGB")
            c.thumbnail((size, size))
            wct = ultrastyle.stylize(np.asarray(c), IMAGES / style, model=MODEL, style_size=size, max_memory=None)
            tiles = [c, Image.open(IMAGES / style).convert("RGB"), Image.fromarray(wct), Image.open(out).convert("RGB")]
            for t in tiles:
                t.thumbnail((cell, cell))
            rows.append(tiles)
            print(f"sheet: {Path(content).stem} x {Path(style).stem}: loss {r['log'][0][2]:.4g} -> {r['log'][-1][2]:.4g}", flush=True)
    height = sum(max(t.height for t in row) for row in rows)
    img = Image.new("RGB", (4 * cell, height), "white")
    y = 0
    for row in rows:
        for i, t in enumerate(row):
            img.paste(t, (i * cell + (cell - t.width) // 2, y))
        y += max(t.height for t in row)
    from ultrastyle.io.atomic import atomic_path

    with atomic_path(path) as tmp_path:
        img.save(tmp_path, format="JPEG", quality=85)
    print(f"sheet: {path} ({path.stat().st_size / 1024:.0f} kB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    w = sub.add_parser("worker")
    w.add_argument("content")
    w.add_argument("style")
    w.add_argument("--content-size", type=int, default=0)
    w.add_argument("--iterations", type=int, default=10)
    w.add_argument("--solver", default="lbfgs")
    w.add_argument("--max-memory", default="none")
    w.add_argument("--tile", type=int)
    w.add_argument("--init", default="content")
    w.add_argument("--threads", type=int, default=1)
    w.add_argument("--output")
    w.add_argument("--scales", default="full")
    w.add_argument("--lr", type=float, default=0.01)
    w.add_argument("--scratch")
    for name in ("solvers", "tiling", "divergence", "large", "sheet", "all"):
        s = sub.add_parser(name)
        s.add_argument("--iterations", type=int, default={"solvers": 20, "tiling": 10, "divergence": 10, "large": 1, "sheet": 40}.get(name, 0))
        s.add_argument("--size", type=int, default={"solvers": 256, "tiling": 512, "divergence": 192, "sheet": 384}.get(name, 0))
        s.add_argument("--tile", type=int, default=128)
        s.add_argument("--megapixels", type=float, default=16.0)
        s.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.what == "worker":
        worker(args)
        return
    if args.what in ("solvers", "all"):
        solvers(args.iterations or 20, args.size or 256)
    if args.what in ("tiling", "all"):
        tiling(args.iterations or 10, args.size or 512, args.tile)
    if args.what in ("divergence", "all"):
        divergence(args.iterations or 10, args.size or 192, 64 if args.what == "all" else args.tile)
    if args.what in ("sheet", "all"):
        sheet(args.iterations or 40, args.size or 384, REPO / "docs" / "optimize_contact_sheet.jpg")
    if args.what in ("large", "all"):
        large(args.megapixels, args.iterations or 1, args.threads)


if __name__ == "__main__":
    main()
