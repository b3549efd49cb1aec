"""int8 encoders with and without ONNX Runtime's exact u8 x u8 products, against float32: speed and error.

On x86 CPUs without VNNI, ORT's u8 x s8 int8 convolutions saturate 16-bit pair sums; `OnnxRuntimeRunner` asks for
exact products there (`EXACT_INT8`, ``session.x64quantprecision``). This prints, for encoders 3-5 of a calibrated
cd-wct-16x bundle on one photo: s/MP (median of 3 after a warm-up, 2 threads) and the mean relative error of the
features against float32, for the saturating kernels, the exact ones, and float32.

    python benchmarks/int8_exact.py --shared ../shared
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import ultrastyle.runtime.backends.onnxruntime_backend as ob
from ultrastyle.calibration.quantize import CalibrationSettings, calibrate_bundle
from ultrastyle.export.bundle import export_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models.pretrained import load_cd_folder

STAGES = (5, 4, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--size", type=int, default=768, help="the photo's long side")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    bundle = export_bundle(load_cd_folder(args.shared / "models/cd-wct-16x", stages=STAGES), work / "b",
                           spec=ExportSpec(stages=STAGES), validate=False)  # fmt: skip
    bundle = calibrate_bundle(bundle.path, args.shared / "images/train", CalibrationSettings(samples=3, tile=128, image_size=384))
    x = resize_long_side(load_image(args.shared / "images/content/cd_content_in1.jpg"), args.size)[None]
    x = x[..., : x.shape[-2] // 16 * 16, : x.shape[-1] // 16 * 16]
    mp = x.shape[-2] * x.shape[-1] / 1e6

    def timed(runner: ob.OnnxRuntimeRunner) -> float:
        times = []
        for _ in range(4):
            t = time.perf_counter()
            for k in STAGES:
                runner.encode(k, x)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:]) / mp

    exact = ob.EXACT_INT8
    print("| products | s/MP | mean rel. error vs fp32 |\n|---|---|---|")
    with ob.OnnxRuntimeRunner(bundle, threads=2) as f32:
        ref = torch.cat([f32.encode(k, x).flatten() for k in STAGES])
        for name, value in (("u8 x s8 (saturating without VNNI)", "0"), ("exact (the default)", exact[1])):
            ob.EXACT_INT8 = (exact[0], value)
            with ob.OnnxRuntimeRunner(bundle, precision="int8", threads=2) as i8:
                got = torch.cat([i8.encode(k, x).flatten() for k in STAGES])
                print(f"| int8, {name} | {timed(i8):.3f} | {float((ref - got).abs().mean() / ref.abs().mean()):.4f} |")
        ob.EXACT_INT8 = exact
        print(f"| float32 | {timed(f32):.3f} | 0 |")


if __name__ == "__main__":
    main()
