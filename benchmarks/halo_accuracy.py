"""Smaller halos against the exact one: error and time of `--halo N` vs `--halo exact`.

Stylizes one photo (default: a CD content photo at 1536 px, style at 1024 px,
5-stage WCT, ONNX Runtime runner, 512 px tile cores so every stage has many
seams) with the exact halo and with reduced halos, and prints the max and mean
absolute difference from the exact result (in [0, 1]), PSNR against it, and
wall time. A reduced halo drops part of each tile's receptive field, so tile
seams appear; this measures how much.

Run from the repository root with ../shared beside it:

    .venv/bin/python benchmarks/halo_accuracy.py [--halos 0,16,32,64] [--size 1536] [--tile 512]

About 1-2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.export.bundle import export_bundle
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS
from ultrastyle.runtime.tiled import style_statistics_tiled, stylize_tiled

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def run(runner, content: torch.Tensor, stats, opts: TilingOptions) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with canvas_from_array(content.numpy(), layout="chw") as cv:
        out = stylize_tiled(runner, cv, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
        result = torch.from_numpy(out.numpy().copy()).clamp(0, 1)
        out.close()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--content", type=Path, default=SHARED / "images/content/cd_content_in1.jpg")
    ap.add_argument("--style", type=Path, default=SHARED / "images/style/cd_style_in1.jpg")
    ap.add_argument("--models", type=Path, default=SHARED / "models/cd-wct-16x")
    ap.add_argument("--size", type=int, default=1536)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--halos", default="0,16,32,64")
    args = ap.parse_args()

    content = resize_long_side(load_image(args.content), args.size)
    style = resize_long_side(load_image(args.style), 1024)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(load_cd_folder(args.models), Path(tmp) / "b", validate=False)
        with OnnxRuntimeRunner(bundle) as runner:
            exact_opts = TilingOptions(tile=args.tile)
            with canvas_from_array(style.numpy(), layout="chw") as sc:
                stats = style_statistics_tiled(runner, sc, DEFAULT_LEVELS, exact_opts)
            exact, t_exact = run(runner, content, stats, exact_opts)
            rows = [("exact", 0.0, 0.0, float("inf"), t_exact)]
            for halo in (int(h) for h in args.halos.split(",")):
                got, t = run(runner, content, stats, TilingOptions(tile=args.tile, halo=halo))
                d = (got - exact).abs()
                psnr = float(-10 * torch.log10((d**2).mean().clamp_min(1e-20)))
                rows.append((str(halo), float(d.max()), float(d.mean()), psnr, t))
    h, w = content.shape[-2:]
    print(f"# halo accuracy: {w}x{h} content, style 1024 px, tile cores {args.tile} px, 5-stage WCT, ONNX Runtime")
    print()
    print("| --halo | max abs diff | mean abs diff | PSNR vs exact (dB) | wall s | time / exact's |")
    print("|---|---|---|---|---|---|")
    for name, mx, mean, psnr, t in rows:
        print(f"| {name} | {mx:.4f} | {mean:.5f} | {psnr:.1f} | {t:.1f} | {t / t_exact:.2f} |")


if __name__ == "__main__":
    main()
