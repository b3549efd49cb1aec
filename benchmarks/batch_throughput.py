"""End-to-end batch throughput of `ultrastyle stylize` against its compute alone.

Two workloads, made from the `../shared/images` photos (JPEG, quality 95, in a
temp folder): (a) 12 photos of 4 MP, (b) 2 photos of 20 MP. For each, and for
PNG and JPEG output:

- ``cli``: `ultrastyle stylize FOLDER --style S -o OUT --format F` in a fresh
  process. Reported: the process's wall time and the batch's own wall time
  (its summary line: from the first read to the last write, without Python's
  start-up and the model load).
- ``compute``: the same pairs through the library in a fresh process, the
  contents decoded into memory first (untimed), nothing written: the
  cascade, the style statistics and the conversion to 8-bit only.

The headline is batch wall / compute. Runs alternate (cli, compute, cli, ...)
``--repeats`` times; medians are printed. On the CPU the default backend
(ONNX Runtime); ``--device cuda`` runs the same on a GPU (the default backend
there). About 25 min on 2 cores with the defaults; ``--quick`` runs (a) with
PNG only, once (~6 min).

    .venv/bin/python benchmarks/batch_throughput.py
    .venv/bin/python benchmarks/batch_throughput.py --quick
    .venv/bin/python benchmarks/batch_throughput.py --device cuda --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
STYLE = SHARED / "images/style/cd_style_in1.jpg"
MODEL = SHARED / "models/cd-wct-16x"


def make_inputs(folder: Path, count: int, mp: float) -> Path:
    """``count`` JPEGs of ``mp`` megapixels, cut and resized from the shared photos."""
    d = folder / f"{count}x{mp:g}MP"
    d.mkdir(parents=True, exist_ok=True)
    photos = sorted((SHARED / "images/large").glob("*.jpg")) + sorted((SHARED / "images/uhd").glob("*.jpg"))
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            if i >= len(photos):  # later copies mirrored, so no two contents are the same
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if i // len(photos) % 2 else Image.Transpose.FLIP_TOP_BOTTOM)
            w, h = im.size
            s = (mp * 1e6 / (w * h)) ** 0.5
            im.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS).save(d / f"photo{i:02d}.jpg", quality=95)
    return d


def run_cli(contents: Path, fmt: str, device: str, out: Path) -> tuple[float, float, float]:
    """(process wall s, batch wall s, megapixels) of one `ultrastyle stylize` run."""
    cmd = [sys.executable, "-m", "ultrastyle.cli.main", "stylize", str(contents), "--style", str(STYLE), "-o", str(out),
           "--format", fmt, "--model", str(MODEL), "--device", device]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})  # the summary on one line
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"cli failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    m = re.search(r"\d+ done, .*? pairs in ([\d.]+) s", r.stdout)  # the batch's wall time (its s/MP shows from 1 MP only)
    assert m, r.stdout
    mp = sum(_mp(p) for p in contents.iterdir())
    return wall, float(m.group(1)), mp


def _mp(p: Path) -> float:
    with Image.open(p) as im:
        return im.size[0] * im.size[1] / 1e6


COMPUTE = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from ultrastyle.api import Stylizer
    from ultrastyle.runtime.batch import StyleBook, stylize_content
    from ultrastyle.runtime.decode import Decoded, load_content
    from ultrastyle.runtime.pairs import Pair, StyleSpec

    contents, style, model, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    with Stylizer(model, device=device) as s:
        opts = s.options()
        decoded = [(p, load_content(p, opts)) for p in sorted(contents.iterdir())]  # untimed
        spec = StyleSpec((style,))
        t0 = time.perf_counter()
        book = StyleBook(s.runner, opts)
        for p, (pixels, original) in decoded:
            (r,) = stylize_content(s.runner, Decoded(pixels, original), [Pair(p, spec, None)], book, opts, raise_errors=True)
        print(json.dumps({"seconds": time.perf_counter() - t0, "backend": s.backend}))
""")


def run_compute(contents: Path, device: str) -> tuple[float, str]:
    r = subprocess.run([sys.executable, "-c", COMPUTE, str(contents), str(STYLE), str(MODEL), device],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"compute failed:\n{r.stderr}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    return got["seconds"], got["backend"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="12 x 4 MP, PNG only, once")
    ap.add_argument("--formats", default="png,jpg")
    ap.add_argument("--workloads", default="12x4,2x20", help="COUNTxMP,...")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.formats, args.workloads = 1, "png", "12x4"
    os.environ.setdefault("ULTRASTYLE_HOME", tempfile.mkdtemp(prefix="ultrastyle-bench-home-"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="ultrastyle-batch-bench-") as tmp:
        tmp = Path(tmp)
        for spec in args.workloads.split(","):
            count, mp = spec.split("x")
            contents = make_inputs(tmp, int(count), float(mp))
            run_compute(contents, args.device)  # warm-up: exports the bundle once, fills the page cache
            for fmt in args.formats.split(","):
                procs, batches, computes = [], [], []
                for i in range(args.repeats):
                    out = tmp / f"out-{spec}-{fmt}-{i}"
                    wall, batch_wall, total_mp = run_cli(contents, fmt, args.device, out)
                    procs.append(wall)
                    batches.append(batch_wall)
                    seconds, backend = run_compute(contents, args.device)
                    computes.append(seconds)
                    print(f"  {spec} MP {fmt} run {i + 1}: cli {wall:.1f} s (batch {batch_wall:.1f} s), compute {seconds:.1f} s",
                          flush=True)  # fmt: skip
                b, c, p = statistics.median(batches), statistics.median(computes), statistics.median(procs)
                rows.append((spec, fmt, backend, total_mp, p, b, c, b / total_mp, c / total_mp, b / c))
    print(f"\ndevice {args.device}, {args.repeats} run(s) each, medians")
    print("| workload | format | backend | MP | cli process s | batch wall s | compute s | batch s/MP | compute s/MP | batch / compute |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec, fmt, backend, mp, p, b, c, bmp, cmp_, ratio in rows:
        print(f"| {spec} MP | {fmt} | {backend} | {mp:.1f} | {p:.1f} | {b:.1f} | {c:.1f} | {bmp:.3f} | {cmp_:.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
