"""TensorRT throughput: megapixels per second per stage network and for the tiled 5-stage cascade.

Per precision (fp32, fp16 by default): builds the CD 16x bundle's engines for
this GPU (kept in the bundle folder, reused on the next run), then reports

- per stage network (encoder, decoder+affine) on one tile: median seconds and
  MP/s, after a warm-up;
- the whole tiled cascade (5 stages, WCT, alpha 0.6) on a synthetic image of
  ``--megapixels``: MP/s end to end (host canvases, pass 1 with device-side
  statistics, pass 2), and the peak device memory in use (cudaMemGetInfo)
  against ``--max-memory``.

Run from the repository root with ../shared beside it, on a machine with an
NVIDIA GPU, TensorRT and cuda-python (``pip install '.[tensorrt]'``):

    .venv/bin/python benchmarks/tensorrt_throughput.py [--precisions fp32,fp16] [--tile 1024] [--megapixels 16] [--max-memory 2GB]

Without a GPU it says what is missing and exits 2: nothing here was measured
on the machines this project is developed on (no GPU); see README.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import median_seconds

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.export.bundle import export_bundle, is_bundle, read_bundle
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.tensorrt_backend import TensorRTRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS
from ultrastyle.runtime.tiled import stylize_tiled
from ultrastyle.trt.build import build_engines
from ultrastyle.trt.env import missing_for_tensorrt, probe_gpus
from ultrastyle.trt.profiles import default_ranges

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO.parent / "shared/models/cd-wct-16x")
    ap.add_argument("--bundle", type=Path, default=Path(tempfile.gettempdir()) / "ultrastyle-bench-cd16x")
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--megapixels", type=float, default=16.0)
    ap.add_argument("--max-memory", default="2GB")
    args = ap.parse_args()
    missing = missing_for_tensorrt()
    if missing:
        print("needs TensorRT on an NVIDIA GPU; missing here: " + "; ".join(missing), file=sys.stderr)
        sys.exit(2)
    budget = parse_bytes(args.max_memory)
    model = load_cd_folder(args.models)
    bundle = read_bundle(args.bundle) if is_bundle(args.bundle) else export_bundle(model, args.bundle)
    gpu = probe_gpus()[0]
    print(f"GPU: {gpu.name} (sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}, {gpu.total_memory / 2**30:.0f} GiB), "
          f"driver {gpu.nvidia_driver} / CUDA {gpu.cuda_driver}")  # fmt: skip
    side = int((args.megapixels * 1e6) ** 0.5)
    yy, xx = np.meshgrid(np.linspace(0, 1, side, dtype=np.float32), np.linspace(0, 1, side, dtype=np.float32), indexing="ij")
    content = np.stack([yy, xx, np.sin(7 * yy) * np.cos(5 * xx) * 0.5 + 0.5])
    style = {k: FeatureStats.of(model.encode(k, torch.rand(1, 3, 512, 512))) for k in DEFAULT_LEVELS}
    for precision in args.precisions.split(","):
        ranges = default_ranges(bundle.arch, bundle.stages, precision, budget)
        report = build_engines(bundle, precision=precision, ranges=ranges, on_step=print)
        print(f"\n[{precision}] engines: {len(report.built)} built, {len(report.fresh)} reused ({report.seconds:.0f} s)")
        with TensorRTRunner(bundle, precision=precision) as r:
            mp = args.tile**2 / 1e6
            print(f"{'network':<18} {'s/tile':>9} {'MP/s':>9}")
            for k in bundle.stages:
                g = bundle.arch.grid(k)
                t = args.tile // g * g
                x = torch.rand(1, 3, t, t)
                c = bundle.arch.feature_channels(k)
                f = r.encode(k, x)
                a, b = torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
                for name, fn in ((f"encoder{k}", lambda: r.encode(k, x)), (f"decoder_affine{k}", lambda: r.decode(k, f, a, b))):
                    s = median_seconds(fn, args.repeats)
                    print(f"{name:<18} {s:9.4f} {mp / s:9.1f}")
            options = TilingOptions(max_memory=budget)  # the plans fit the engines' profiles (`TensorRTRunner.traits`)
            free0, _ = r.mem.mem_info()
            peak = [0]

            def on_tile(*_):
                peak[0] = max(peak[0], free0 - r.mem.mem_info()[0])

            t0 = time.perf_counter()
            with canvas_from_array(content, layout="chw") as cv:
                out = stylize_tiled(r, cv, style, options, method="wct", alpha=0.6, levels=DEFAULT_LEVELS, on_tile=on_tile)
                out.close()
            dt = time.perf_counter() - t0
            print(f"tiled 5-stage cascade, {side}x{side} ({side * side / 1e6:.1f} MP): {dt:.1f} s, "
                  f"{side * side / 1e6 / dt:.2f} MP/s; peak device memory in use {peak[0] / 2**30:.2f} GiB "
                  f"(budget {budget / 2**30:.2f} GiB, tile {options.tile or 'auto'})")  # fmt: skip


if __name__ == "__main__":
    main()
