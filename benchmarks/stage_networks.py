"""Per stage network: seconds per megapixel and achieved GFLOP/s, PyTorch eager vs ONNX Runtime.

Runs each CD 16x encoder and decoder+affine network on one tile (default
1024 x 1024) with both runners side by side in one process, after a warm-up,
and prints the median of ``--repeats`` runs. FLOPs are 2 x the convolutions'
multiply-adds from the architecture spec (`ArchSpec.macs_per_pixel`), so the
gap to the machine's GEMM rate (about 150 GFLOP/s fp32 here, DESIGN.md §5)
is visible per network.

Run from the repository root with ../shared beside it:

    .venv/bin/python benchmarks/stage_networks.py [--tile 1024] [--repeats 5] [--threads 2]

About 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import median_seconds

from ultrastyle.export.bundle import export_bundle
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner
from ultrastyle.runtime.backends.torch_backend import TorchRunner

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO.parent / "shared/models/cd-wct-16x")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_cd_folder(args.models)
    arch = model.arch
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(model, Path(tmp) / "bundle")
        runners = {"torch": TorchRunner(model), "onnxruntime": OnnxRuntimeRunner(bundle, threads=args.threads)}
        mp = args.tile * args.tile / 1e6
        x = torch.rand(1, 3, args.tile, args.tile)
        rows = []
        totals = {name: 0.0 for name in runners}
        for name, runner in runners.items():
            with runner:
                for k in model.stages:
                    c = arch.feature_channels(k)
                    f = runner.encode(k, x)
                    a, b = torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
                    for kind, fn in (("encoder", lambda: runner.encode(k, x)), ("decoder", lambda: runner.decode(k, f, a, b))):
                        sec = median_seconds(fn, args.repeats)
                        flop = 2 * arch.macs_per_pixel(k, kind) * args.tile * args.tile
                        rows.append((name, f"{kind}{k}", sec, sec / mp, flop / sec / 1e9))
                        totals[name] += sec / mp
                    del f
    print(f"# stage networks on a {args.tile}x{args.tile} tile, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.repeats}")  # fmt: skip
    print()
    print("| backend | network | s/tile | s/MP | GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, net, sec, spmp, gflops in rows:
        print(f"| {name} | {net} | {sec:.3f} | {spmp:.3f} | {gflops:.1f} |")
    print()
    print("| backend | all 10 networks, s/MP |")
    print("|---|---|")
    for name, total in totals.items():
        print(f"| {name} | {total:.2f} |")
    if totals["onnxruntime"]:
        print(f"\ntorch / onnxruntime: {totals['torch'] / totals['onnxruntime']:.2f}x")


if __name__ == "__main__":
    main()
