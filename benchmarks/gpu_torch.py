"""PyTorch on a CUDA GPU: precision x compile x tiled/whole, quality against float32, network-only and floor figures.

What it measures
----------------
The CD 16x WCT cascade (5 stages, alpha 0.6, style resized to ``--style-size``
px long side) through the PyTorch runner on ``cuda``, for each ``--configs``
entry, each ``--sizes`` image and each ``--paths`` path. A config is
``PRECISION[+compile[+graphs]][+hostfit][+syncio][+hostcache]``: the networks in ``fp32`` (IEEE, TF32 off;
``--tf32`` leaves PyTorch's TF32 defaults on), ``fp16`` or ``bf16``
(statistics, eigendecompositions and the fit in float64 either way);
``+compile``: the stage networks through ``torch.compile`` with the affine map
folded into each decoder's first convolution (`runtime.backends.torch_engine`);
``+graphs``: compiled with ``mode="reduce-overhead"``, which captures each
graph as a CUDA graph and replays it (no launch per kernel; outputs are the
graph's buffers, so tiles are written in line, not behind);
``+hostfit``: the WCT fit on the CPU (``fit_on="host"``) instead of on the GPU;
``+syncio``: tiled rows only, tile reads and writes of host canvases in line
instead of overlapped with compute (``TilingOptions(overlap_io=False)``,
`runtime.tile_io`), to show what the overlap saves; ``+hostcache``: tiled rows
only, feature caches planned as on a CPU (every stage whose encoder costs
`CACHE_MACS_PER_VALUE` per cached float, canvases off the GPU where they then do
not fit) instead of `GPU_HOST_CACHE_MACS_PER_VALUE`'s rule (`core.plan`), to
show what re-encoding saves. Tiled rows print their plan: where the canvases
are and which stages cache features.

- ``whole``: each stage on the whole image (``--no-tile``); skipped where the
  estimate (``--whole-gib-per-mp``) exceeds the GPU's free memory.
- ``tiled``: the library's tiled path with ``TilingOptions(max_memory=...)``
  (``--max-memory``, default 2GB), what ``ultrastyle stylize --backend torch
  --device cuda --max-memory 2GB`` runs.

Sizes are megapixels (16:9, or the photo's aspect ratio) or ``WxH`` (the photo
resized to cover it and centre-cropped). Timed span (wall clock,
``sync()`` at both ends): the content canvas built from the
uint8 image, the 5-stage cascade and the conversion of the result to a uint8
(H, W, 3) array on the host. Not timed: the style statistics (computed once per
config, as a batch reuses them; with the eager networks of the config's
precision, so a compiled config compiles only the content's shapes), reading
images, loading models. Each row runs once untimed on the same input first
(for ``+compile`` rows that run compiles: its excess over the timed median is
the ``compile s`` column), then ``--repeats`` timed runs (median). Peak GPU
memory: ``torch.cuda.max_memory_allocated`` of the timed runs.

``--networks``: the network-only figure: the 5 stage encoders + decoders (A = I,
b = 0) on one ``--net-size`` square image, per config, ms/MP and TFLOP/s
(multiply-adds x 2 from the layer list); and stage 5 alone. Same shapes as the
whole-image cascade at that size, so compiled configs reuse its graphs.

``--floors``: the figures the GPU path is held against: FLOP per megapixel of
the cascade's networks, the fp16 matrix rate and the copy bandwidth measured
here (8192^3 products; a 2 GiB copy), the arithmetic floor (FLOP / rate) and
the activation-traffic floor (each layer's input read once and output written
once in fp16, padding/bias/ReLU fused; / bandwidth), in ms/MP.

``--psnr-pairs N``: quality against float32: N content x style pairs (contents
from ``--pairs-content`` folders, styles from ``--pairs-style``, cycled),
each content resized and cropped to ``--psnr-size`` (square), whole-image, each
non-fp32 config's output against the fp32 config's: PSNR (dB, [0, 1] outputs
clamped), max and mean abs error; mean and worst pair.

``--budget-s``: rows not started by then are reported as skipped (the device
check must end in time); rows run in order: floors, networks, PSNR, then sizes
in the given order with every config.

How to run
----------
On a machine with a CUDA GPU (benchmarks/gpu_check.sh runs the full check)::

    python benchmarks/gpu_torch.py --model ../shared/models/cd-wct-16x \\
        --image ../shared/images/large/lomiri_Dragonfly_by_Bolly.jpg --style ../shared/images/style/cd_style_in1.jpg
    python benchmarks/gpu_torch.py --model DIR --sizes 4096x4096 --configs fp32,fp16,fp16+compile --networks --floors

Prints markdown tables (``--json PATH`` writes every row).

Results
-------
In benchmarks/README.md ("gpu_torch.py"). Before the precision and compile
options: H100 80GB, torch 2.11.0+cu130, IEEE float32, tiled 2GB 0.071-0.11
s/MP at 16-100 MP, whole-image 0.029-0.044 s/MP, tiled = whole exactly in uint8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import ultrastyle.core.plan as plan_module
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.tile_memory import parse_bytes
from ultrastyle.io.images import IMAGE_SUFFIXES, array_to_tensor, read_image, resize_long_side
from ultrastyle.models.pretrained import StyleModel, load_model
from ultrastyle.runtime.backends.torch_backend import TorchRunner
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.tiled import canvas_to_image, content_canvas, plan_image_for, stylize_tiled

GiB = 2**30
DEV = torch.device("cuda")  # --device cpu: a smoke run of this script's logic on a machine without a GPU (no figures)


def dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Config:
    precision: str = "fp32"
    compile: bool = False
    host_fit: bool = False
    sync_io: bool = False
    host_cache: bool = False
    graphs: bool = False  # +graphs: torch.compile(mode="reduce-overhead"), which replays CUDA graphs

    FLAGS = ("compile", "graphs", "hostfit", "syncio", "hostcache")

    @classmethod
    def parse(cls, text: str) -> Config:
        precision, *flags = text.strip().split("+")
        bad = set(flags) - set(cls.FLAGS)
        if precision not in ("fp32", "fp16", "bf16") or bad or ("graphs" in flags and "compile" not in flags):
            raise SystemExit(f"bad config {text!r}: PRECISION[+compile[+graphs]][+hostfit][+syncio][+hostcache], PRECISION fp32|fp16|bf16")
        return cls(precision, "compile" in flags, "hostfit" in flags, "syncio" in flags, "hostcache" in flags, "graphs" in flags)

    @property
    def tiled_only(self) -> bool:
        return self.sync_io or self.host_cache

    def __str__(self) -> str:
        on = {"compile": self.compile, "graphs": self.graphs, "hostfit": self.host_fit, "syncio": self.sync_io, "hostcache": self.host_cache}
        return self.precision + "".join(f"+{f}" for f in self.FLAGS if on[f])


def parse_size(text: str) -> tuple[int, int] | float:
    """``"16"`` -> 16.0 (MP); ``"4096x4096"`` -> (4096, 4096)."""
    if "x" in text:
        w, h = text.lower().split("x")
        return int(w), int(h)
    return float(text)


def make_content(size: tuple[int, int] | float, image: Path | None) -> np.ndarray:
    """(H, W, 3) uint8: ``size`` MP (16:9 or the photo's aspect ratio), or exactly (W, H) (photo resized and cropped)."""
    if image is not None:
        from PIL import Image

        with Image.open(image) as im:
            im = im.convert("RGB")
            if isinstance(size, tuple):
                w, h = size
                scale = max(w / im.width, h / im.height)
                im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.LANCZOS)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                return np.asarray(im.crop((left, top, left + w, top + h)))
            scale = math.sqrt(size * 1e6 / (im.width * im.height))
            return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS))
    if isinstance(size, tuple):
        w, h = size
    else:
        w = round(math.sqrt(size * 1e6 * 16 / 9))
        h = round(size * 1e6 / w)
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


class Bench:
    """One runner per config (eager twins for the style statistics), opened once."""

    def __init__(self, model: StyleModel, tf32: bool) -> None:
        self.model, self.tf32 = model, tf32
        self.runners: dict[Config, TorchRunner] = {}
        self.eager: dict[str, TorchRunner] = {}

    def runner(self, cfg: Config) -> TorchRunner:
        key = Config(cfg.precision, cfg.compile, graphs=cfg.graphs)  # +hostfit, +syncio and +hostcache share the runner (and its compiled graphs)
        if key not in self.runners:
            mode = "reduce-overhead" if cfg.graphs else None
            self.runners[key] = TorchRunner(self.model, tf32=self.tf32, precision=cfg.precision, compile=cfg.compile, compile_mode=mode)
        return self.runners[key]

    def style_stats(self, cfg: Config, style: torch.Tensor) -> dict:
        if cfg.precision not in self.eager:
            self.eager[cfg.precision] = TorchRunner(self.model, tf32=self.tf32, precision=cfg.precision)
        r = self.eager[cfg.precision]
        with r:
            return style_statistics(r, style, DEFAULT_LEVELS)


def tiled_options(cfg: Config, max_memory: int) -> TilingOptions:
    # The CPU smoke run overlaps too (runners leave it off on the CPU), so it runs the path a GPU run takes;
    # +graphs does not (its outputs are the graph's buffers: the runner refuses the overlap).
    overlap = False if cfg.sync_io else (True if DEV.type == "cpu" and not cfg.graphs else None)
    return TilingOptions(max_memory=max_memory, overlap_io=overlap)


def planned_as(cfg: Config) -> contextlib.AbstractContextManager:
    """``+hostcache``: the planner's GPU cache rule off (caches as on a CPU) while the row runs."""
    return mock.patch.object(plan_module, "GPU_HOST_CACHE_MACS_PER_VALUE", 0) if cfg.host_cache else contextlib.nullcontext()


def plan_summary(runner: TorchRunner, cfg: Config, h: int, w: int, max_memory: int) -> str:
    """Where a tiled row's canvases go, which stages cache features, tiles per stage (pass 2)."""
    with planned_as(cfg):
        p = plan_image_for(runner, h, w, DEFAULT_LEVELS, tiled_options(cfg, max_memory))
    where = "gpu" if p.site.device is not None else "disk" if p.site.disk_dir else "ram"
    return f"{where}; cache {''.join(str(s.stage) for s in p.stages if s.cache) or '-'}; tiles {'/'.join(str(len(s.decode_tiles())) for s in p.stages)}"


def run_once(runner: TorchRunner, cfg: Config, content: np.ndarray, stats: dict, path: str, max_memory: int) -> tuple[float, np.ndarray]:
    """Seconds for content canvas + cascade + conversion to uint8 on the host, and the uint8 result."""
    sync()
    t0 = time.perf_counter()
    if path == "whole":
        x = array_to_tensor(content)
        y = stylize(runner, x, stats, method="wct", alpha=0.6, levels=DEFAULT_LEVELS, fit_on="host" if cfg.host_fit else "auto")
        out = (y.clamp(0, 1).mul(255).add(0.5)).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        del y
    else:
        opts = tiled_options(cfg, max_memory)
        with planned_as(cfg):
            cv = content_canvas(runner, content, opts, DEFAULT_LEVELS)
            try:
                res = stylize_tiled(runner, cv, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
                try:
                    out = canvas_to_image(res, np.uint8)
                finally:
                    res.close()
            finally:
                cv.close()
    sync()
    return time.perf_counter() - t0, out


def network_flops_and_bytes(model: StyleModel, stages: tuple[int, ...] = DEFAULT_LEVELS, elem: int = 2) -> tuple[float, float]:
    """(FLOP, activation bytes) per image pixel of every stage's encoder + decoder (2 x multiply-adds; fp16 bytes)."""
    flops = traffic = 0.0
    for k in stages:
        for layers, scale in ((model.encoders[k].layers, 1.0), (model.decoders[k].layers, 1.0 / 4 ** (k - 1))):
            s = scale  # pixels of this layer's input per image pixel
            for layer in layers:
                if layer.kind == "conv":
                    flops += 2 * layer.cin * layer.cout * layer.kernel**2 * s
                    traffic += (layer.cin + layer.cout) * s * elem
                    c = layer.cout
                elif layer.kind == "pool":
                    traffic += c * s * elem * 1.25
                    s /= 4
                else:
                    traffic += c * s * elem * 5
                    s *= 4
    return flops, traffic


def measure_floors(model: StyleModel) -> dict:
    n = 8192 if DEV.type == "cuda" else 256
    a = torch.randn(n, n, device=DEV, dtype=torch.float16 if DEV.type == "cuda" else torch.float32)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    sync()
    tflops = 10 * 2 * n**3 / (time.perf_counter() - t) / 1e12
    del a
    src = torch.empty(GiB if DEV.type == "cuda" else 2**24, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync()
    tbps = 10 * 2 * src.numel() / (time.perf_counter() - t) / 1e12
    del src, dst
    flops, traffic = network_flops_and_bytes(model)
    return {
        "gflop_per_mp": round(flops * 1e6 / 1e9, 1), "fp16_matmul_tflops": round(tflops, 1), "copy_tb_s": round(tbps, 2),
        "arith_floor_ms_per_mp": round(flops * 1e6 / (tflops * 1e12) * 1e3, 3),
        "traffic_gb_per_mp": round(traffic * 1e6 / 1e9, 2), "traffic_floor_ms_per_mp": round(traffic * 1e6 / (tbps * 1e12) * 1e3, 3),
    }  # fmt: skip


def networks_row(bench: Bench, cfg: Config, side: int, repeats: int, stages: tuple[int, ...]) -> dict:
    """ms/MP of ``stages``' encoders + decoders on one side x side image (A = I, b = 0)."""
    runner = bench.runner(cfg)
    x = torch.rand(1, 3, side, side, device=DEV)
    maps = {k: (torch.eye(c := bench.model.arch.feature_channels(k), dtype=torch.float64, device=DEV),
                torch.zeros(c, dtype=torch.float64, device=DEV)) for k in stages}  # fmt: skip

    def once() -> float:
        sync()
        t = time.perf_counter()
        for k in stages:
            runner.decode(k, runner.encode(k, x), *maps[k])
        sync()
        return time.perf_counter() - t

    with runner:
        first = once()
        secs = statistics.median(once() for _ in range(max(1, repeats)))
    mp = side * side / 1e6
    flops, _ = network_flops_and_bytes(bench.model, stages)
    row = {"what": f"networks {'+'.join(map(str, stages))}", "config": str(cfg), "size": f"{side}x{side}",
           "ms_per_mp": round(secs / mp * 1e3, 2), "tflops": round(flops * side * side / secs / 1e12, 1)}  # fmt: skip
    if cfg.compile:
        row["compile_s"] = round(first - secs, 1)
    return row


def psnr_rows(bench: Bench, configs: list[Config], contents: list[Path], styles: list[Path], pairs: int, side: int, style_size: int) -> list[dict]:
    ref_cfg = Config("fp32")
    checked = [c for c in configs if c.precision != "fp32" and not c.tiled_only]  # +syncio, +hostcache: the same whole-image output
    found: dict[str, list[tuple[float, float, float]]] = {str(c): [] for c in checked}
    for i in range(pairs):
        content = array_to_tensor(make_content((side, side), contents[i % len(contents)]))
        style = make_style(styles[i % len(styles)], style_size)
        outs = {}
        for cfg in [ref_cfg, *checked]:
            fit_on = "host" if cfg.host_fit else "auto"
            try:  # a config that cannot run (or compile) leaves its column empty; the check goes on
                runner = bench.runner(cfg)
                stats = bench.style_stats(cfg, style)
                with runner:
                    outs[str(cfg)] = stylize(runner, content, stats, method="wct", alpha=0.6, levels=DEFAULT_LEVELS, fit_on=fit_on).clamp(0, 1)
            except Exception as exc:
                print(f"# {cfg}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr, flush=True)
        ref = outs.pop(str(ref_cfg), None)
        if ref is None:
            break
        for name, y in outs.items():
            d = (y - ref).abs()
            mse = d.square().mean().item()
            found[name].append((10 * math.log10(1 / max(mse, 1e-20)), d.max().item(), d.mean().item()))
        print(f"# pair {i + 1}/{pairs}: {contents[i % len(contents)].name} x {styles[i % len(styles)].name}: "
              + ", ".join(f"{n} {v[-1][0]:.1f} dB" for n, v in found.items()), file=sys.stderr, flush=True)  # fmt: skip
    return [
        {"config": name, "pairs": len(v), "size": f"{side}x{side}", "psnr_mean_db": round(statistics.mean(p for p, _, _ in v), 2),
         "psnr_min_db": round(min(p for p, _, _ in v), 2), "max_abs": round(max(m for _, m, _ in v), 4),
         "mean_abs": round(statistics.mean(a for _, _, a in v), 5)}  # fmt: skip
        for name, v in found.items()
        if v
    ]


def image_files(folders: str) -> list[Path]:
    out: list[Path] = []
    for folder in folders.split(","):
        if folder:
            out += sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return out


def table(rows: list[dict], cols: list[str], heads: dict[str, str]) -> None:
    print("| " + " | ".join(heads.get(c, c) for c in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) if c != "wall_s" or "error" not in r else r["error"] for c in cols) + " |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cd-wct-16x", help="zoo name or CD weights folder")
    ap.add_argument("--image", type=Path, help="content photo to resize (default: synthetic)")
    ap.add_argument("--style", type=Path, help="style image (default: synthetic)")
    ap.add_argument("--style-size", type=int, default=1024)
    ap.add_argument("--sizes", default="16,40,100", help="megapixels or WxH, comma-separated")
    ap.add_argument("--paths", default="whole,tiled")  # whole first: the tiled rows get their tiled/whole ratio
    ap.add_argument("--configs", default="fp32", help="PRECISION[+compile[+graphs]][+hostfit][+syncio][+hostcache], comma-separated (e.g. fp32,fp16,bf16,fp16+compile)")
    ap.add_argument("--large-configs", help="configs for sizes above 20 MP (default: --configs)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row after the untimed one (median)")
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--whole-gib-per-mp", type=float, default=0.75, help="estimate used to skip whole-image runs that cannot fit")
    ap.add_argument("--compare", action="store_true", help="largest uint8 difference of each row from the first row's output (the first config's whole-image one with the default --paths)")
    ap.add_argument("--tf32", action="store_true", help="fp32 configs: leave PyTorch's TF32 defaults on (cuDNN convolutions in TF32)")
    ap.add_argument("--networks", action="store_true", help="network-only rows (5 stages, and stage 5 alone) per config")
    ap.add_argument("--net-size", type=int, default=4096)
    ap.add_argument("--floors", action="store_true", help="FLOP/MP, measured fp16 matmul rate and copy bandwidth, floors")
    ap.add_argument("--psnr-pairs", type=int, default=0)
    ap.add_argument("--psnr-size", type=int, default=4096)
    ap.add_argument("--pairs-content", default="", help="content folders for --psnr-pairs, comma-separated")
    ap.add_argument("--pairs-style", default="", help="style folders for --psnr-pairs, comma-separated")
    ap.add_argument("--budget-s", type=float, default=0, help="start no row after this many seconds (0: no limit)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of the script (320x240 content, 128 px networks, 96MB tiles, fp16 configs run as bf16; sizes and repeats ignored), no figures")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available to PyTorch: this benchmark needs one", file=sys.stderr)
        return 2
    if DEV.type == "cpu":  # the smoke run exercises every code path on sizes a CPU finishes in seconds
        args.sizes, args.net_size, args.psnr_size, args.style_size = "320x240", 128, 128, 128
        args.max_memory, args.repeats, args.psnr_pairs = "96MB", 1, min(args.psnr_pairs, 2)
    start = time.perf_counter()
    configs = [Config.parse(c) for c in args.configs.split(",")]
    large = [Config.parse(c) for c in args.large_configs.split(",")] if args.large_configs else configs
    if DEV.type == "cpu":  # PyTorch's CPU float16 convolutions are refused (tens of times slower): bf16 runs the same rows
        configs, large = (list(dict.fromkeys(replace(c, precision="bf16") if c.precision == "fp16" else c for c in cs)) for cs in (configs, large))
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    paths = args.paths.split(",")
    budget = parse_bytes(args.max_memory)
    name = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "CPU (smoke run)"
    bench = Bench(load_model(args.model, device=DEV, progress=False), args.tf32)
    style = make_style(args.style, args.style_size)
    report: dict = {"device": name, "torch": torch.__version__, "tf32": args.tf32, "floors": None, "networks": [], "psnr": [], "rows": []}

    def save() -> None:  # after every row: a run cut short by its time limit still leaves what it measured
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))

    def out_of_time(what: str) -> bool:
        late = args.budget_s and time.perf_counter() - start > args.budget_s
        if late:
            print(f"# skipped (past --budget-s {args.budget_s:.0f} s): {what}", file=sys.stderr, flush=True)
            report.setdefault("skipped", []).append(what)
        return bool(late)

    if args.floors and not out_of_time("floors"):
        report["floors"] = measure_floors(bench.model)
        print(f"# floors {report['floors']}", file=sys.stderr, flush=True)
    if args.networks:
        for cfg in configs:
            for stages in (DEFAULT_LEVELS, (5,)):
                if cfg.host_fit or cfg.tiled_only or out_of_time(f"networks {cfg} {stages}"):
                    continue
                try:
                    row = networks_row(bench, cfg, args.net_size, max(3, args.repeats), stages)
                except Exception as exc:  # a compile error, say: the check goes on
                    row = {"what": f"networks {'+'.join(map(str, stages))}", "config": str(cfg), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                report["networks"].append(row)
                save()
                print(f"# {row}", file=sys.stderr, flush=True)
    if args.psnr_pairs and not out_of_time("psnr"):
        contents, styles = image_files(args.pairs_content), image_files(args.pairs_style)
        if not contents or not styles:
            print("--psnr-pairs needs --pairs-content and --pairs-style folders with images", file=sys.stderr)
            return 2
        report["psnr"] = psnr_rows(bench, configs, contents, styles, args.psnr_pairs, args.psnr_size, args.style_size)
        save()
    stats_by_cfg: dict[str, dict] = {}
    for size in sizes:
        t = time.perf_counter()
        content = make_content(size, args.image)
        h, w = content.shape[:2]
        mp = h * w / 1e6
        print(f"# {w}x{h} input built in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        reference: np.ndarray | None = None
        for cfg in large if mp > 20 else configs:
            try:
                runner = bench.runner(cfg)
                if cfg.precision not in stats_by_cfg:
                    stats_by_cfg[cfg.precision] = bench.style_stats(cfg, style)
            except Exception as exc:  # this config cannot run here: its rows say why, the others go on
                report["rows"].append({"mp": round(mp, 1), "size": f"{w}x{h}", "config": str(cfg), "path": ",".join(paths),
                                       "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})  # fmt: skip
                save()
                continue
            stats = stats_by_cfg[cfg.precision]
            for p in paths:
                if (cfg.host_fit and p != "whole") or (cfg.tiled_only and p == "whole"):  # rows that would repeat another's
                    continue
                label = "whole" if p == "whole" else f"tiled {args.max_memory}"
                row = {"mp": round(mp, 1), "size": f"{w}x{h}", "config": str(cfg), "path": label}
                if p != "whole":
                    try:
                        row["plan"] = plan_summary(runner, cfg, h, w, budget)
                    except Exception as exc:  # the row itself will say what fails
                        row["plan"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                if out_of_time(f"{cfg} {label} {w}x{h}"):
                    continue
                free = torch.cuda.mem_get_info(DEV)[0] if DEV.type == "cuda" else 64 * GiB
                if p == "whole" and mp * args.whole_gib_per_mp * GiB > free:
                    row["error"] = f"skipped: ~{mp * args.whole_gib_per_mp:.0f} GiB estimated, {free / GiB:.0f} GiB free"
                    report["rows"].append(row)
                    save()
                    continue
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
                graphs = dynamo_graphs()
                try:
                    with runner:
                        first, out = run_once(runner, cfg, content, stats, p, budget)
                        if DEV.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(DEV)
                        secs = statistics.median(run_once(runner, cfg, content, stats, p, budget)[0] for _ in range(max(1, args.repeats)))
                except Exception as exc:  # one row fails, the check goes on
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    if DEV.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    row.update(wall_s=round(secs, 3), ms_per_mp=round(secs / mp * 1e3, 2), mp_per_s=round(mp / secs, 1))
                    if cfg.compile:
                        row["compile_s"] = round(first - secs, 1)
                        row["compiles"] = dynamo_graphs() - graphs  # graphs Dynamo compiled for this row
                    if args.compare:
                        if reference is None:
                            reference = out
                        row["max_diff_uint8"] = int(np.abs(out.astype(np.int16) - reference.astype(np.int16)).max())
                    # tiled / whole of this config and size, side by side in this run; set now, so a run stopped by
                    # its time limit keeps the ratio (the whole row of a config runs before its tiled one)
                    whole = [x for x in report["rows"] if x["size"] == row["size"] and x["config"] == row["config"]
                             and x["path"] == "whole" and "ms_per_mp" in x]  # fmt: skip
                    if p != "whole" and whole:
                        row["tiled_over_whole"] = round(row["ms_per_mp"] / whole[0]["ms_per_mp"], 2)
                row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated(DEV) / GiB, 3) if DEV.type == "cuda" else ""
                report["rows"].append(row)
                save()
                print(f"# {row}", file=sys.stderr, flush=True)
        del content

    tf32 = "TF32 on (PyTorch defaults)" if args.tf32 else "fp32 in IEEE (TF32 off)"
    print(f"\n{name}, torch {torch.__version__}, {tf32}, style {args.style_size} px, 5 stages, WCT alpha 0.6; absolute times on this machine\n")
    if report["floors"]:
        f = report["floors"]
        print(f"Floors: {f['gflop_per_mp']} GFLOP/MP; fp16 matmul {f['fp16_matmul_tflops']} TFLOP/s -> {f['arith_floor_ms_per_mp']} ms/MP; "
              f"activations {f['traffic_gb_per_mp']} GB/MP at {f['copy_tb_s']} TB/s -> {f['traffic_floor_ms_per_mp']} ms/MP\n")  # fmt: skip
    if report["networks"]:
        table(report["networks"], ["what", "config", "size", "ms_per_mp", "tflops", "compile_s", "error"],
              {"ms_per_mp": "ms/MP", "tflops": "TFLOP/s", "compile_s": "compile s"})  # fmt: skip
    if report["psnr"]:
        table(report["psnr"], ["config", "pairs", "size", "psnr_mean_db", "psnr_min_db", "max_abs", "mean_abs"],
              {"psnr_mean_db": "PSNR vs fp32 dB (mean)", "psnr_min_db": "PSNR worst pair", "max_abs": "max abs", "mean_abs": "mean abs"})  # fmt: skip
    cols = ["mp", "size", "config", "path", "wall_s", "ms_per_mp", "tiled_over_whole", "compile_s", "compiles", "peak_alloc_gib", "plan"]
    if args.compare:
        cols.append("max_diff_uint8")
    table(report["rows"], cols, {"mp": "MP", "size": "W x H", "wall_s": "wall s", "ms_per_mp": "ms/MP", "tiled_over_whole": "tiled/whole",
                                 "compile_s": "compile s", "peak_alloc_gib": "peak GPU GiB", "max_diff_uint8": "max diff (uint8)"})  # fmt: skip
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
