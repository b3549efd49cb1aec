"""PyTorch on a CUDA GPU: tiled (``--max-memory``) vs whole-image stylization by image size.

What it measures
----------------
The CD 16x WCT cascade (5 stages, alpha 0.6, style resized to 1024 px long
side) through the PyTorch runner on ``cuda``, for images of ``--sizes``
megapixels (16, 40, 100 by default, 16:9), on two paths:

- ``tiled``: the library's tiled path with ``TilingOptions(max_memory=...)``
  (``--max-memory``, default 2GB), what ``ultrastyle stylize --backend torch
  --device cuda --max-memory 2GB`` runs: canvases on the GPU while they take
  at most half the budget, else in host RAM (tiles cross through page-locked
  buffers), pass 1 statistics on the GPU, pass 2 decode;
- ``whole``: the whole-image reference (``--no-tile``): each stage on the whole
  image on the GPU. Skipped where the estimate (``--whole-gib-per-mp`` GiB per
  MP) exceeds the GPU's free memory; a run that still fails (out of memory, a
  kernel's size limit) is reported with its error and the benchmark goes on.

Timed span (wall clock, ``torch.cuda.synchronize()`` at both ends): the style
statistics, the content canvas built from the uint8 image, the 5-stage
cascade and the conversion of the result to a uint8 (H, W, 3) array; not
reading or writing image files, importing torch or loading the models. One
warm-up run per path (a 2 MP image) comes first, so cuDNN's first-call set-up
is not timed. Peak GPU memory is ``torch.cuda.max_memory_allocated`` (tensors)
and ``max_memory_reserved`` (PyTorch's caching allocator, what the process
holds), both reset before each run; the model weights (about 10 MB) are in
them. The content is the ``--image`` photo resized (PIL, LANCZOS; upscaled
past its size) or, without it, a synthetic image (smooth gradients plus
noise); the style is ``--style`` or a synthetic texture. ``--compare`` adds
the largest difference between the tiled and whole outputs (uint8) where both
ran.

TF32: the PyTorch runner turns TF32 off while it is active (IEEE float32, the
reference's precision); ``--tf32`` runs with PyTorch's defaults instead
(cuDNN convolutions in TF32) to show what that costs or gains.

How to run
----------
From the repository root, on a machine with a CUDA GPU::

    python benchmarks/gpu_torch.py --model ../shared/models/cd-wct-16x \\
        --image ../shared/images/large/lomiri_Dragonfly_by_Bolly.jpg --style ../shared/images/style/cd_style_in1.jpg
    python benchmarks/gpu_torch.py --model DIR --sizes 16 --paths tiled --max-memory 1GB

Prints a markdown table (and ``--json PATH`` writes the rows). On an H100 the
default run takes about 40 s, much of it resizing the inputs.

Results
-------
In benchmarks/README.md ("gpu_torch.py"): H100 80GB, torch 2.11.0+cu130, IEEE
float32, content ``../shared/images/large/lomiri_Dragonfly_by_Bolly.jpg``
resized, style ``cd_style_in1.jpg`` at 1024 px, ``--compare``: tiled 2GB
0.071-0.11 s/MP at 16-100 MP (0.50 before the canvas changes), whole-image
0.029-0.044 s/MP, tiled = whole exactly in uint8.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.io.images import array_to_tensor, read_image, resize_long_side
from ultrastyle.models.pretrained import load_model
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.tiled import canvas_to_image, content_canvas, style_statistics_tiled, stylize_tiled

GiB = 2**30


def make_content(mp: float, image: Path | None) -> np.ndarray:
    """(H, W, 3) uint8 of about ``mp`` megapixels, 16:9 (or the photo's aspect ratio)."""
    if image is not None:
        from PIL import Image

        with Image.open(image) as im:
            im = im.convert("RGB")
            scale = math.sqrt(mp * 1e6 / (im.width * im.height))
            return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS))
    w = round(math.sqrt(mp * 1e6 * 16 / 9))
    h = round(mp * 1e6 / w)
    rng = np.random.default_rng(0)
    out = np.empty((h, w, 3), np.uint8)
    x = np.linspace(0, 6 * np.pi, w, dtype=np.float32)
    for r in range(0, h, 1024):
        y = np.linspace(r, min(h, r + 1024) - 1, min(h, r + 1024) - r, dtype=np.float32)[:, None] / h * 4 * np.pi
        band = np.stack([np.sin(x + y), np.cos(0.7 * x - y), np.sin(0.3 * x * np.cos(y))], -1) * 100 + 128
        band += rng.normal(0, 12, band.shape).astype(np.float32)
        out[r : r + 1024] = np.clip(band, 0, 255).astype(np.uint8)
    return out


def make_style(path: Path | None, size: int) -> torch.Tensor:
    if path is not None:
        img = array_to_tensor(read_image(path))
    else:
        g = torch.Generator().manual_seed(1)
        img = torch.nn.functional.interpolate(torch.rand(1, 3, 64, 64, generator=g), size=(768, 1024), mode="bicubic")[0]
        img = (img + 0.1 * torch.rand(img.shape, generator=g)).clamp(0, 1)
    return resize_long_side(img, size)


def run_once(runner: TorchRunner, content: np.ndarray, style: torch.Tensor, path: str, max_memory: int) -> tuple[float, np.ndarray]:
    """Seconds for style statistics + cascade + conversion to uint8, and the uint8 result."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if path == "whole":
        stats = style_statistics(runner, style, DEFAULT_LEVELS)
        x = array_to_tensor(content)
        y = stylize(runner, x, stats, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
        out = (y.clamp(0, 1).mul(255).add(0.5)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        del y
    else:
        opts = TilingOptions(max_memory=max_memory)
        with canvas_from_array(style.numpy(), layout="chw") as sc:
            stats = style_statistics_tiled(runner, sc, DEFAULT_LEVELS, opts)
        h, w = content.shape[:2]
        cv = content_canvas(runner, content, opts, DEFAULT_LEVELS)
        try:
            res = stylize_tiled(runner, cv, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
            try:
                out = canvas_to_image(res, np.uint8)
            finally:
                res.close()
        finally:
            cv.close()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cd-wct-16x", help="zoo name or CD weights folder")
    ap.add_argument("--image", type=Path, help="content photo to resize (default: synthetic)")
    ap.add_argument("--style", type=Path, help="style image (default: synthetic)")
    ap.add_argument("--style-size", type=int, default=1024)
    ap.add_argument("--sizes", default="16,40,100", help="megapixels, comma-separated")
    ap.add_argument("--paths", default="tiled,whole")
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--whole-gib-per-mp", type=float, default=0.75, help="estimate used to skip whole-image runs that cannot fit")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--tf32", action="store_true", help="leave PyTorch's TF32 defaults on (cuDNN convolutions in TF32)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device available to PyTorch: this benchmark needs one", file=sys.stderr)
        return 2
    sizes = [float(s) for s in args.sizes.split(",")]
    paths = args.paths.split(",")
    budget = parse_bytes(args.max_memory)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    model = load_model(args.model, device=dev, progress=False)
    style = make_style(args.style, args.style_size)
    runner = TorchRunner(model, tf32=args.tf32)
    rows = []
    outputs: dict[tuple[float, str], np.ndarray] = {}
    with runner:
        warm = make_content(2, None)
        for p in paths:
            run_once(runner, warm, style, p, budget)
        for mp in sizes:
            t = time.perf_counter()
            content = make_content(mp, args.image)
            h, w = content.shape[:2]
            print(f"# {w}x{h} input built in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            for p in paths:
                row = {"mp": round(h * w / 1e6, 1), "size": f"{w}x{h}", "path": p if p == "whole" else f"tiled {args.max_memory}", "device": name}
                free, _ = torch.cuda.mem_get_info(dev)
                if p == "whole" and mp * args.whole_gib_per_mp * GiB > free:
                    row["error"] = f"skipped: ~{mp * args.whole_gib_per_mp:.0f} GiB estimated, {free / GiB:.0f} GiB free"
                    rows.append(row)
                    print(row, file=sys.stderr, flush=True)
                    continue
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                try:
                    secs, out = run_once(runner, content, style, p, budget)
                except (torch.OutOfMemoryError, RuntimeError) as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    torch.cuda.empty_cache()
                else:
                    row.update(wall_s=round(secs, 2), s_per_mp=round(secs / (h * w / 1e6), 4), mp_per_s=round(h * w / 1e6 / secs, 2))
                    if args.compare:
                        outputs[mp, p] = out
                row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(dev) / GiB, 3)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(dev) / GiB, 3)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
            if args.compare and (mp, "tiled") in outputs and (mp, "whole") in outputs:
                d = np.abs(outputs[mp, "tiled"].astype(np.int16) - outputs[mp, "whole"].astype(np.int16)).max()
                for r in rows:
                    if r["mp"] == round(h * w / 1e6, 1):
                        r["max_diff_uint8"] = int(d)
            outputs.clear()
            del content
    tf32 = "TF32 on (PyTorch defaults)" if args.tf32 else "IEEE float32 (TF32 off)"
    print(f"\n{name}, torch {torch.__version__}, {tf32}, style {args.style_size} px, 5 stages, WCT alpha 0.6\n")
    cols = ["mp", "size", "path", "wall_s", "s_per_mp", "mp_per_s", "peak_alloc_gib", "peak_reserved_gib"]
    if args.compare:
        cols.append("max_diff_uint8")
    heads = {"mp": "MP", "size": "W x H", "wall_s": "wall s", "s_per_mp": "s/MP", "mp_per_s": "MP/s",
             "peak_alloc_gib": "peak GPU allocated GiB", "peak_reserved_gib": "peak GPU reserved GiB", "max_diff_uint8": "max diff (uint8)"}  # fmt: skip
    print("| " + " | ".join(heads.get(c, c) for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [str(r.get(c, "")) for c in cols]
        if "error" in r:
            cells[3] = r["error"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "tf32": args.tf32, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
