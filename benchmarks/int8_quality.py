"""INT8 calibration: quality of the full 5-stage stylization against fp32, and CPU speed, per method.

What it measures
----------------
The CD 16x bundle is calibrated (`ultrastyle.calibration`) once per
configuration (method x which layers stay float x per-tensor/per-channel
weights) on ``--images`` (default ``../shared/images/train``), in a copy of
the bundle. Then, on ONNX Runtime's CPU provider:

- quality: every content x style pair from ``../shared/images/content`` and
  ``../shared/images/style`` (first ``--styles`` styles; 3 x 4 = 12 pairs by
  default) is stylized whole-image (5-stage WCT, alpha 0.6, content long side
  ``--size``, style long side ``--style-size``) by the fp32 and the int8
  runner; PSNR and SSIM (`ultrastyle.distill.metrics`) of int8 against fp32,
  mean and worst pair;
- speed: one ``--speed-size`` image through the tiled path (``--max-memory``),
  fp32 and int8 runs alternating, median of ``--repeats`` after a warm-up,
  seconds per megapixel and the fp32/int8 ratio: side by side in one process.

How to run
----------
From the repository root, with ``../shared`` beside it, on an idle machine::

    .venv/bin/python benchmarks/int8_quality.py                       # all methods, ~15-25 min on 2 cores
    .venv/bin/python benchmarks/int8_quality.py --methods minmax --keep-float ends --quick

Targets (issue #7): the default method reaches PSNR >= 30 dB against fp32 and
runs >= 1.8x faster per megapixel than fp32 on ONNX Runtime CPU.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _timing import median_seconds  # noqa: E402

from ultrastyle.calibration.quantize import METHODS, CalibrationSettings, calibrate_bundle  # noqa: E402
from ultrastyle.core.canvas import canvas_from_array  # noqa: E402
from ultrastyle.core.plan import TilingOptions  # noqa: E402
from ultrastyle.core.tile_memory import parse_bytes  # noqa: E402
from ultrastyle.distill.metrics import psnr, ssim  # noqa: E402
from ultrastyle.io.images import load_image, resize_long_side  # noqa: E402
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner  # noqa: E402
from ultrastyle.runtime.backends.select import ensure_bundle  # noqa: E402
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize  # noqa: E402
from ultrastyle.runtime.memory import keep_freed_memory  # noqa: E402
from ultrastyle.runtime.tiled import stylize_tiled  # noqa: E402

SHARED = ROOT.parent / "shared"


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _pairs(args: argparse.Namespace) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
    contents = sorted((SHARED / "images/content").iterdir())
    styles = sorted(p for p in (SHARED / "images/style").iterdir() if p.suffix.lower() in (".jpg", ".png", ".webp"))[: args.styles]
    out = []
    for c, s in itertools.product(contents, styles):
        out.append((c.stem, resize_long_side(load_image(c), args.size), s.stem, resize_long_side(load_image(s), args.style_size)))
    return out


def quality(fp32: OnnxRuntimeRunner, int8: OnnxRuntimeRunner, pairs, reference: dict) -> tuple[list[float], list[float]]:
    psnrs, ssims = [], []
    for cname, content, sname, style in pairs:
        key = (cname, sname)
        if key not in reference:
            reference[key] = stylize(fp32, content, style_statistics(fp32, style, DEFAULT_LEVELS)).clamp(0, 1)
        out = stylize(int8, content, style_statistics(int8, style, DEFAULT_LEVELS)).clamp(0, 1)
        psnrs.append(psnr(out, reference[key]))
        ssims.append(ssim(out, reference[key]))
    return psnrs, ssims


def speed(bundle, args: argparse.Namespace) -> tuple[float, float]:
    """Median s/MP of fresh fp32 and int8 runners through the tiled path, runs alternating.

    Fresh runners: after the quality pairs (many whole-image shapes) an ONNX
    Runtime arena is fragmented, and the int8 runner measured 1.1-2.4x slower
    than the same runner fresh.
    """
    with OnnxRuntimeRunner(bundle) as fp32, OnnxRuntimeRunner(bundle, precision="int8") as int8:
        return _alternate(fp32, int8, args)


def _alternate(fp32: OnnxRuntimeRunner, int8: OnnxRuntimeRunner, args: argparse.Namespace) -> tuple[float, float]:
    img = resize_long_side(load_image(SHARED / "images/large/lomiri_Dragonfly_by_Bolly.jpg"), args.speed_size)
    style = resize_long_side(load_image(SHARED / "images/style/cd_style_in1.jpg"), args.style_size)
    mp = img.shape[1] * img.shape[2] / 1e6
    options = TilingOptions(max_memory=parse_bytes(args.max_memory))
    stats = {id(r): style_statistics(r, style, DEFAULT_LEVELS) for r in (fp32, int8)}

    def run(r: OnnxRuntimeRunner) -> None:
        c = canvas_from_array(img.numpy(), layout="chw")
        stylize_tiled(r, c, stats[id(r)], options, method="wct", alpha=0.6, levels=DEFAULT_LEVELS).close()

    times: dict[int, list[float]] = {id(fp32): [], id(int8): []}
    for _ in range(args.repeats):
        for r in (fp32, int8):
            times[id(r)].append(median_seconds(lambda r=r: run(r), 1))
    return statistics.median(times[id(fp32)]) / mp, statistics.median(times[id(int8)]) / mp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", type=_csv, default=list(METHODS))
    ap.add_argument("--keep-float", type=_csv, default=["ends", "transform"])
    ap.add_argument("--per-channel", type=_csv, default=["yes", "no"])
    ap.add_argument("--images", type=Path, default=SHARED / "images/train")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--size", type=int, default=512, help="content long side for the quality pairs")
    ap.add_argument("--style-size", type=int, default=512)
    ap.add_argument("--styles", type=int, default=4, help="first N style images (x 3 contents = pairs)")
    ap.add_argument("--speed-size", type=int, default=1600, help="long side of the speed image")
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--activations", choices=["int8", "uint8"], default="int8", help="uint8: asymmetric activations for the CPU (not TensorRT)")
    ap.add_argument("--no-speed", action="store_true", help="quality only")
    ap.add_argument("--quick", action="store_true", help="2 styles, 4 samples, 1 repeat")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc (the CLI keeps freed memory)")
    args = ap.parse_args()
    if not args.system_malloc:
        keep_freed_memory()  # as the command line does
    if args.quick:  # what was not given explicitly
        for name, value in (("styles", 2), ("samples", 4), ("repeats", 1)):
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    base = ensure_bundle(SHARED / "models/cd-wct-16x")
    pairs = _pairs(args)
    reference: dict = {}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="ultrastyle-int8-"))
    try:
        for method, keep, pc in itertools.product(args.methods, args.keep_float, args.per_channel):
            folder = work / f"{method}-{keep}-{pc}"
            shutil.copytree(base.path, folder)
            settings = CalibrationSettings(method=method, keep_float=keep, per_channel=pc == "yes", samples=args.samples, tile=args.tile, activations=args.activations)
            t0 = time.perf_counter()
            bundle = calibrate_bundle(folder, args.images, settings)
            calib_s = time.perf_counter() - t0
            with OnnxRuntimeRunner(bundle) as fp32, OnnxRuntimeRunner(bundle, precision="int8") as int8:
                ps, ss = quality(fp32, int8, pairs, reference)
            f_s, i_s = (float("nan"), float("nan")) if args.no_speed else speed(bundle, args)
            rows.append((method, keep, pc, calib_s, statistics.mean(ps), min(ps), statistics.mean(ss), min(ss), f_s, i_s))
            print(f"done {method} {keep} per-channel={pc}: PSNR {statistics.mean(ps):.1f} dB, {f_s / i_s:.2f}x", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(pairs)} pairs, content {args.size} px, style {args.style_size} px; speed: {args.speed_size} px long side, "
          f"--max-memory {args.max_memory}, median of {args.repeats}; torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print("| method | float layers | per-channel | calibrate s | PSNR mean (dB) | PSNR min | SSIM mean | SSIM min | fp32 s/MP | int8 s/MP | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m, k, pc, cs, pm, pmin, sm, smin, f_s, i_s in rows:
        print(f"| {m} | {k} | {pc} | {cs:.0f} | {pm:.1f} | {pmin:.1f} | {sm:.3f} | {smin:.3f} | {f_s:.2f} | {i_s:.2f} | {f_s / i_s:.2f}x |")


if __name__ == "__main__":
    main()
