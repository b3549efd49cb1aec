"""AdaIN decoder for the CD 16x stage-4 encoder (issue #8): held-out losses, CPU speed, contact sheet.

What it measures
----------------
Three relu4_1 decoders for the published CD 16x stage-4 encoder
(``../shared/models/cd-wct-16x/4SE.pth``) are compared on held-out
content x style pairs:

- **trained**: the AdaIN decoder (``--decoder``, default
  ``out/adain/model/4SD.pth``), or with ``--checkpoint`` the decoder weights of
  a training checkpoint (``out/adain/model/runs/4SD/checkpoint.pt``: the
  ``"trained"`` state dict of `ultrastyle.distill.trainer`), so an in-progress
  run can be looked at;
- **init**: the WCT reconstruction decoder ``4SD.pth`` of cd-wct-16x, from
  which the training started (``--init``);
- **untrained**: the same architecture randomly initialised (PyTorch's default
  conv init after ``torch.manual_seed(--seed)``, as ``train-decoder --init random``).

Held-out data: the contents are the trainer's validation split of
``--images`` (`ultrastyle.distill.data.split_files` with ``--val-fraction``
0.1, the split `ultrastyle.distill.jobs` makes: a hash of each file name, so
these photos were never trained on) plus ``../shared/images/content/*.jpg``;
the styles are ``../shared/images/style/cd_style_in{1,2,3,4}.jpg`` (training
used the ``gcompris_*`` styles only). Contents and styles are resized so the
long side is ``--size`` (upsampling the smaller ones) and centre-cropped by at
most 7 px to the encoder's pooling grid (8).

Losses: the terms of the AdaIN training objective (`DecoderTask` in AdaIN
mode, computed with the same functions of `ultrastyle.distill.losses`): with
``t = AdaIN(E(c), E(s))`` at alpha 1 and ``o = D(t)`` (unclamped, as in
training),

- content = ``mse(E(o), t)`` at relu4_1,
- style = ``Σ_b mse(μ(E_b(o)), μ(E_b(s))) + mse(σ(E_b(o)), σ(E_b(s)))`` over
  relu1_1 .. relu4_1,
- total = content + ``--style-weight`` (10, the trainer's default) x style.

The row "content image (no decoder)" gives the same terms for the content
photo ``c`` itself in place of ``o``: how far the input is from the target
``t`` and from the style. The first pair is also run through `DecoderTask`
itself and the numbers checked against it. Means and medians are over all
pairs; the JSON (``--out``) holds every pair.

Speed: the trained model through the real CLI, ``ultrastyle stylize --model M
--method adain --levels 4 --alpha 1 --backend {torch,onnxruntime} --threads N``
(default tiled path), one ~2 MP content (``cd_content_in1.jpg`` resized to
long side ``--speed-size`` 1448) with ``cd_style_in1.jpg`` (``--style-size``
1024), each run a fresh process: one untimed warm-up (ONNX Runtime: exports
and caches the bundle on first use), then the median of ``--repeats`` runs of
the CLI's own seconds per megapixel (wall time of the pair: style statistics,
reading, stylizing, writing) and of the process's CPU seconds (user+sys,
including Python and torch start-up). ``M`` is the trained decoder's model
folder when it has ``4SE.pth`` beside ``4SD.pth`` (``out/adain/model``), else a
folder assembled in ``--out``/bench_model (encoder + the evaluated decoder).

Contact sheet: one row per pair (``--sheet-rows``, default 4: different
held-out contents, each with another held-out style), columns content | style
| trained result | untrained-decoder result (``--sheet-init`` adds the WCT
decoder's), 256 px cells, a caption naming every row's files; PNG at
``--sheet``, and with ``--sheet-jpeg PATH`` a JPEG at quality 85 (< 400 KB)
for the docs.

How to run
----------
From the repository root, with ``../shared`` beside it, once training has
written ``out/adain/model/4SD.pth``::

    .venv/bin/python benchmarks/adain_decoder.py --sheet-jpeg docs/adain_contact_sheet.jpg
    .venv/bin/python benchmarks/adain_decoder.py --no-speed --sheet-init   # losses and a 5-column sheet only

    # an in-progress run (newest checkpoint), small and quick:
    .venv/bin/python benchmarks/adain_decoder.py --checkpoint --size 256 --max-contents 2 --repeats 1 --threads 1

Expected runtime on the 2-core machines: full defaults (15 contents x 4
styles = 60 pairs at 512 px, 3 decoders: ~1.5 min on one thread; speed: 2
backends x (1 + 3) CLI runs of ~8-12 s at 2 MP) about 3-5 minutes; the small
command above about 1 minute. Timings are wall-clock and only indicative on a
loaded machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ultrastyle.core.arch import spec_to_dict  # noqa: E402
from ultrastyle.distill import sources  # noqa: E402
from ultrastyle.distill.data import list_images, readable_images, split_files  # noqa: E402
from ultrastyle.distill.losses import adain, mse, style_loss  # noqa: E402
from ultrastyle.distill.outputs import write_network  # noqa: E402
from ultrastyle.distill.tasks import DecoderTask  # noqa: E402
from ultrastyle.distill.trainer import CHECKPOINT, read_checkpoint  # noqa: E402
from ultrastyle.io.images import load_image, resize_long_side, save_image  # noqa: E402
from ultrastyle.models import convert  # noqa: E402
from ultrastyle.models.networks import Decoder, Encoder  # noqa: E402
from ultrastyle.models.sources import ARCH_FILE  # noqa: E402

STAGE = 4
LAST = f"relu{STAGE}_1"
SHARED = ROOT.parent / "shared"
CD16X = SHARED / "models" / "cd-wct-16x"
# The decoder the package ships (`ultrastyle-adain-16x`); point --decoder at a fresh run's out/adain/model/4SD.pth to judge it.
DEFAULT_DECODER = ROOT / "ultrastyle/models/weights/ultrastyle-adain-16x/4SD.pth"
DEFAULT_RUN = ROOT / "out/adain/model/runs/4SD"
DEFAULT_STYLES = [SHARED / f"images/style/cd_style_in{i}.jpg" for i in (1, 2, 3, 4)]
CELL = 256
JPEG_LIMIT = 400_000


def _rel(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies under it or beside it (``../shared``)."""
    p = Path(os.path.abspath(path))  # not resolve(): keep .venv/bin/python a venv path
    for base, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        try:
            return prefix + str(p.relative_to(base))
        except ValueError:
            continue
    return str(path)


# ---------------------------------------------------------------- data


def held_out_contents(images: Path, val_fraction: float, extra: Path) -> tuple[list[Path], int]:
    """(the trainer's validation files of ``images``, then ``extra/*.jpg``; how many are validation files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the trainer leaves unreadable files out the same way
        files = readable_images(list_images(images), min_side=1)
    _, val = split_files(files, val_fraction)
    return val + sorted(extra.glob("*.jpg")), len(val)


def spaced(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (first and last included), in order; all when ``n`` >= len."""
    if n <= 0 or n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def prepare(path: Path, size: int, grid: int) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: long side ``size``, centre-cropped down to multiples of ``grid``."""
    img = resize_long_side(load_image(path), size)
    h, w = img.shape[-2:]
    hh, ww = h // grid * grid, w // grid * grid
    top, left = (h - hh) // 2, (w - ww) // 2
    return img[:, top : top + hh, left : left + ww][None].contiguous()


# ---------------------------------------------------------------- networks


@dataclass
class DecoderInfo:
    key: str  # trained / init / untrained
    label: str
    source: str
    net: Decoder
    step: int | None = None


def load_trained(args: argparse.Namespace, encoder: Encoder) -> DecoderInfo:
    spec = encoder.spec
    if args.checkpoint is not None:
        path = Path(args.checkpoint)
        if path.is_dir():
            path = path / CHECKPOINT
        ck = read_checkpoint(path)
        dec = Decoder(spec, STAGE)
        convert.load_weights(dec, ck["trained"], path)
        step = int(ck["step"])
        return DecoderInfo("trained", f"trained (checkpoint step {step}/{ck.get('steps', '?')})", _rel(path), dec.eval(), step)
    path = Path(args.decoder)
    if not path.is_file():
        raise SystemExit(
            f"error: {_rel(path)}: no such decoder file (training not finished?); "
            f"evaluate the newest checkpoint with --checkpoint (default {_rel(DEFAULT_RUN / CHECKPOINT)})"
        )
    dec = convert.cd_decoder(path, STAGE, spec=spec)
    step = torch.load(path, map_location="cpu", weights_only=True).get("step")
    return DecoderInfo("trained", f"trained ({path.name}{f', step {step}' if step is not None else ''})", _rel(path), dec, step)


def load_decoders(args: argparse.Namespace, encoder: Encoder) -> list[DecoderInfo]:
    trained = load_trained(args, encoder)
    init = sources.load_decoder(args.init, STAGE)
    torch.manual_seed(args.seed)
    untrained = Decoder(encoder.spec, STAGE).eval()
    return [
        trained,
        DecoderInfo("init", "init (WCT decoder 4SD.pth)", _rel(Path(args.init) / f"{STAGE}SD.pth") if Path(args.init).is_dir() else str(args.init), init),
        DecoderInfo("untrained", f"untrained (random, seed {args.seed})", f"Decoder(cd16x, 4), torch.manual_seed({args.seed})", untrained),
    ]


# ---------------------------------------------------------------- losses


@torch.no_grad()
def adain_terms(encoder: Encoder, image: torch.Tensor, t: torch.Tensor, style_taps: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(content, style) terms of the AdaIN objective for ``image`` in place of the decoder output."""
    taps = encoder.taps(image)
    return float(mse(taps[LAST], t)), float(style_loss(taps, style_taps))


@torch.no_grad()
def check_against_task(encoder: Encoder, decoder: Decoder, c: torch.Tensor, s: torch.Tensor, found: tuple[float, float]) -> None:
    """The training task's own numbers for one pair must be ours (same functions, same order)."""
    task = DecoderTask(encoder, decoder, mode="adain")
    got = task({"content": c, "style": s})
    decoder.requires_grad_(False)
    for name, mine in zip(("content", "style"), found):
        ref = float(got[name])
        if abs(ref - mine) > 1e-4 * max(1.0, abs(ref)):
            raise AssertionError(f"{name} loss {mine} differs from DecoderTask's {ref}")


@dataclass
class PairResult:
    content: str
    style: str
    split: str  # "val" (trainer's validation photos) or "content" (../shared/images/content)
    size: tuple[int, int]
    losses: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> {content, style, total}


def evaluate(
    encoder: Encoder,
    decoders: list[DecoderInfo],
    contents: list[Path],
    n_val: int,
    styles: list[Path],
    args: argparse.Namespace,
    keep: set[tuple[int, int]],
) -> tuple[list[PairResult], dict[tuple[int, int], dict[str, torch.Tensor]]]:
    grid = encoder.spec.grid(STAGE)
    w = args.style_weight
    results, images = [], {}
    style_data = []
    with torch.no_grad():
        for sp in styles:
            s = prepare(sp, args.size, grid)
            style_data.append((s, encoder.taps(s)))
        for ci, cp in enumerate(contents):
            c = prepare(cp, args.size, grid)
            fc = encoder(c)
            for si, sp in enumerate(styles):
                s, style_taps = style_data[si]
                t = adain(fc, style_taps[LAST])
                r = PairResult(_rel(cp), _rel(sp), "val" if ci < n_val else "content", tuple(c.shape[-2:]))
                cl, sl = adain_terms(encoder, c, t, style_taps)
                r.losses["content_image"] = {"content": cl, "style": sl, "total": cl + w * sl}
                outs = {}
                for d in decoders:
                    o = d.net(t)
                    cl, sl = adain_terms(encoder, o, t, style_taps)
                    if not results:
                        check_against_task(encoder, d.net, c, s, (cl, sl))
                    r.losses[d.key] = {"content": cl, "style": sl, "total": cl + w * sl}
                    outs[d.key] = o[0].clamp(0, 1)
                if (ci, si) in keep:
                    images[(ci, si)] = {"content": c[0], "style": s[0], **outs}
                results.append(r)
                print(
                    f"  [{len(results)}/{len(contents) * len(styles)}] {cp.name} x {sp.name}: "
                    + ", ".join(f"{k} {v['total']:.3g}" for k, v in r.losses.items()),
                    file=sys.stderr,
                    flush=True,
                )
    return results, images


def summarize(results: list[PairResult], keys: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for k in keys:
        vals = {m: [r.losses[k][m] for r in results] for m in ("content", "style", "total")}
        out[k] = {f"{m}_{a}": f(v) for m, v in vals.items() for a, f in (("mean", statistics.fmean), ("median", statistics.median))}
    return out


def loss_table(summary: dict[str, dict[str, float]], labels: dict[str, str], w: float) -> str:
    ref = summary.get("init", {}).get("total_mean")
    lines = [
        f"| decoder | content mean | content median | style mean | style median | total (content + {w:g}·style) mean | total median | total / init's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, s in summary.items():
        ratio = f"{s['total_mean'] / ref:.3f}" if ref else ""
        lines.append(
            f"| {labels[k]} | {s['content_mean']:.4g} | {s['content_median']:.4g} | {s['style_mean']:.4g} | "
            f"{s['style_median']:.4g} | {s['total_mean']:.4g} | {s['total_median']:.4g} | {ratio} |"
        )
    return "\n".join(lines)


def per_style_table(results: list[PairResult], keys: list[str], labels: dict[str, str]) -> str:
    styles = list(dict.fromkeys(r.style for r in results))
    lines = ["| style | " + " | ".join(labels[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for st in styles:
        rs = [r for r in results if r.style == st]
        lines.append(f"| {Path(st).name} | " + " | ".join(f"{statistics.fmean(r.losses[k]['total'] for r in rs):.4g}" for k in keys) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- contact sheet


def _cell(img: torch.Tensor, size: int):
    from PIL import Image

    a = (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(a)
    im.thumbnail((size, size), Image.LANCZOS)
    cell = Image.new("RGB", (size, size), (235, 235, 235))
    cell.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return cell


def contact_sheet(rows: list[tuple[dict[str, torch.Tensor], str, str]], columns: list[tuple[str, str]], caption: str, cell: int = CELL):
    """PIL image: a header of column labels, one row per pair, then ``caption`` (wrapped)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, line_h = 4, 14
    width = cell * len(columns)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    chars = max(20, int(width / max(1.0, probe.textlength("abcdefghij_0123456789", font=font) / 21)) - 2)
    cap_lines = [ln for para in caption.split("\n") for ln in (textwrap.wrap(para, chars) or [""])]
    header = line_h + 2 * pad
    sheet = Image.new("RGB", (width, header + cell * len(rows) + len(cap_lines) * line_h + 2 * pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (_, label) in enumerate(columns):
        tw = draw.textlength(label, font=font)
        draw.text((j * cell + max(pad, (cell - tw) / 2), pad), label, fill="black", font=font)
    for i, (imgs, _, _) in enumerate(rows):
        for j, (key, _) in enumerate(columns):
            sheet.paste(_cell(imgs[key], cell), (j * cell, header + i * cell))
    y = header + cell * len(rows) + pad
    for ln in cap_lines:
        draw.text((pad, y), ln, fill="black", font=font)
        y += line_h
    return sheet


def write_sheets(images, picks, contents, styles, decoders, args) -> dict[str, str]:
    labels = {d.key: d.label for d in decoders}
    columns = [("content", "content"), ("style", "style"), ("trained", labels["trained"]), ("untrained", labels["untrained"])]
    if args.sheet_init:
        columns.insert(3, ("init", labels["init"]))
    rows = [(images[p], contents[p[0]].name, styles[p[1]].name) for p in picks]
    caption = (
        f"AdaIN at alpha 1 with the CD 16x stage-4 encoder, long side {args.size}; "
        + "; ".join(f"{d.label}: {d.source}" for d in decoders if any(k == d.key for k, _ in columns))
        + ". Rows (content | style): "
        + "; ".join(f"{i + 1}. {c} | {s}" for i, (_, c, s) in enumerate(rows))
    )
    sheet = contact_sheet(rows, columns, caption)
    out = {}
    path = Path(args.sheet)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    out["png"] = _rel(path)
    if args.sheet_jpeg:
        jpath = Path(args.sheet_jpeg)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(jpath, quality=85, optimize=True)
        n = jpath.stat().st_size
        out["jpeg"] = _rel(jpath)
        out["jpeg_bytes"] = n
        if n >= JPEG_LIMIT:
            print(f"warning: {jpath} is {n / 1e3:.0f} KB, over the {JPEG_LIMIT // 1000} KB budget for the docs", file=sys.stderr)
    return out


# ---------------------------------------------------------------- speed


def speed_model_folder(trained: DecoderInfo, args: argparse.Namespace, encoder: Encoder) -> Path:
    """A model folder holding exactly the evaluated encoder and trained decoder at stage 4."""
    if args.checkpoint is None:
        folder = Path(args.decoder).parent
        if Path(args.decoder).name == f"{STAGE}SD.pth" and (folder / f"{STAGE}SE.pth").is_file():
            found = convert.cd_encoder(folder / f"{STAGE}SE.pth", STAGE, spec=encoder.spec)
            if all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), encoder.state_dict().values())):
                return folder
            print(f"warning: {folder}/{STAGE}SE.pth is not the --encoder's; timing an assembled folder", file=sys.stderr)
    folder = Path(args.out) / "bench_model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ARCH_FILE).write_text(json.dumps(spec_to_dict(encoder.spec), indent=1) + "\n", encoding="utf-8")
    write_network(folder, f"{STAGE}SE.pth", encoder)
    write_network(folder, f"{STAGE}SD.pth", trained.net, trained.step or 0)
    return folder


def _ultrastyle_command() -> list[str]:
    exe = Path(sys.executable).with_name("ultrastyle")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "ultrastyle.cli.main"]


def _run_cli(cmd: list[str]) -> dict[str, float | str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"([0-9.]+) s/MP", proc.stdout)
    if not m:
        raise RuntimeError(f"no s/MP in the output of {shlex.join(cmd)}:\n{proc.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"s_per_mp": float(m.group(1)), "process_wall_s": wall, "process_cpu_s": cpu, "stderr": proc.stderr}


def measure_speed(model: Path, args: argparse.Namespace, threads: int) -> tuple[list[dict], list[str]]:
    rows, commands = [], []
    work = Path(args.out) / "bench_speed"
    work.mkdir(parents=True, exist_ok=True)
    content = work / f"content_{args.speed_size}.png"
    img = resize_long_side(load_image(args.speed_content), args.speed_size)
    save_image(img, content)
    h, w = img.shape[-2:]
    for backend in args.backends:
        cmd = _ultrastyle_command() + [
            "stylize", _rel(content), "--style", _rel(args.speed_style), "--model", _rel(model),
            "--method", "adain", "--levels", str(STAGE), "--alpha", "1", "--backend", backend,
            "--threads", str(threads), "--style-size", str(args.style_size), "-o", _rel(work / "out"),
        ]  # fmt: skip
        commands.append(shlex.join(cmd))
        print(f"speed: {backend}: warm-up + {args.repeats} runs", file=sys.stderr, flush=True)
        warm = _run_cli(cmd)
        runs = [_run_cli(cmd) for _ in range(args.repeats)]
        exported = "exporting" in str(warm["stderr"])
        rows.append(
            {
                "backend": backend, "threads": threads, "content": f"{w}x{h}", "megapixels": h * w / 1e6,
                "s_per_mp_median": statistics.median(float(r["s_per_mp"]) for r in runs),
                "s_per_mp_runs": [r["s_per_mp"] for r in runs],
                "process_wall_s_median": statistics.median(float(r["process_wall_s"]) for r in runs),
                "process_cpu_s_median": statistics.median(float(r["process_cpu_s"]) for r in runs),
                "warmup_s_per_mp": warm["s_per_mp"], "warmup_exported_bundle": exported,
            }
        )  # fmt: skip
    return rows, commands


def speed_table(rows: list[dict]) -> str:
    lines = [
        "| backend | threads | content | s/MP (CLI pair time), median | runs | process wall s | process CPU s (incl. start-up) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        runs = ", ".join(f"{v:.2f}" for v in r["s_per_mp_runs"])
        lines.append(
            f"| {r['backend']} | {r['threads']} | {r['content']} ({r['megapixels']:.2f} MP) | {r['s_per_mp_median']:.2f} | "
            f"{runs} | {r['process_wall_s_median']:.1f} | {r['process_cpu_s_median']:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--decoder", type=Path, default=DEFAULT_DECODER, help="trained AdaIN decoder file (CD format {k}SD.pth)")
    p.add_argument("--checkpoint", nargs="?", const=DEFAULT_RUN / CHECKPOINT, default=None, type=Path,
                   help="evaluate a training checkpoint (file or run folder) instead of --decoder; bare flag: the newest of the default run")  # fmt: skip
    p.add_argument("--encoder", type=Path, default=CD16X, help="model folder of the stage-4 encoder")
    p.add_argument("--init", type=Path, default=CD16X, help="model folder (or file) of the initial WCT decoder")
    p.add_argument("--images", type=Path, default=SHARED / "images/train", help="the training images folder (held out: its validation split)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the trainer's val_fraction")
    p.add_argument("--contents", type=Path, default=SHARED / "images/content", help="more held-out contents (*.jpg)")
    p.add_argument("--styles", type=Path, nargs="+", default=DEFAULT_STYLES, help="held-out styles")
    p.add_argument("--size", type=int, default=512, help="long side of contents and styles for the losses")
    p.add_argument("--max-contents", type=int, default=0, help="use this many held-out contents, spread over the list (0: all)")
    p.add_argument("--style-weight", type=float, default=10.0, help="style weight of the total (the trainer's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the untrained decoder")
    p.add_argument("--threads", type=int, default=0, help="torch threads here and --threads of the CLI runs (0: torch's default, the physical cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed CLI runs per backend (after one warm-up)")
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], help="CLI backends to time")
    p.add_argument("--no-speed", action="store_true", help="skip the CLI timings")
    p.add_argument("--speed-content", type=Path, default=SHARED / "images/content/cd_content_in1.jpg")
    p.add_argument("--speed-size", type=int, default=1448, help="long side of the timed content (1448: 2.1 MP for a square)")
    p.add_argument("--speed-style", type=Path, default=SHARED / "images/style/cd_style_in1.jpg")
    p.add_argument("--style-size", type=int, default=1024, help="--style-size of the timed CLI runs")
    p.add_argument("--out", type=Path, default=ROOT / "out/adain", help="folder for the results JSON (and scratch)")
    p.add_argument("--sheet", type=Path, default=ROOT / "out/adain/contact_sheet.png", help="contact sheet PNG")
    p.add_argument("--sheet-jpeg", type=Path, default=None, help="also write the sheet as a JPEG (quality 85) for the docs")
    p.add_argument("--sheet-rows", type=int, default=4, help="pairs shown on the sheet")
    p.add_argument("--sheet-init", action="store_true", help="add a column for the init (WCT) decoder")
    p.add_argument("--sheet-contents", nargs="+", default=None, help="file names of the held-out contents to show, one row each (default: --sheet-rows spread over the list)")
    return p.parse_args(argv)


def _check_run_config(args: argparse.Namespace) -> list[str]:
    """Warnings where the training run's saved config disagrees with what is held out here."""
    run = Path(args.checkpoint) if args.checkpoint is not None else DEFAULT_RUN
    cfg_path = (run if run.is_dir() else run.parent) / "config.yaml"
    if not cfg_path.is_file():
        return []
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    notes = []
    if cfg.get("val_fraction") is not None and float(cfg["val_fraction"]) != args.val_fraction:
        notes.append(f"the run used val_fraction {cfg['val_fraction']}, this uses {args.val_fraction}")
    if cfg.get("images") and Path(cfg["images"]).resolve() != Path(args.images).resolve():
        notes.append(f"the run trained on {cfg['images']}, held-out split taken from {_rel(args.images)}")
    style_dir = Path(cfg.get("style") or "")
    if cfg.get("style") and style_dir.is_dir():
        trained_styles = {p.resolve() for p in style_dir.iterdir()}
        overlap = [s.name for s in args.styles if Path(s).resolve() in trained_styles]
        if overlap:
            notes.append(f"held-out styles were in the training styles: {', '.join(overlap)}")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print("command: " + shlex.join([_rel(sys.executable), _rel(__file__)] + (sys.argv[1:] if argv is None else argv)))
    print(f"threads: {threads} (torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f})")
    t_start = time.perf_counter()

    encoder = sources.load_encoder(args.encoder, STAGE)
    decoders = load_decoders(args, encoder)
    labels = {"content_image": "content image c (no decoder)", **{d.key: d.label for d in decoders}}
    for d in decoders:
        print(f"decoder {d.key}: {d.source}")
    notes = _check_run_config(args)
    for n in notes:
        print(f"warning: {n}")

    all_contents, n_val = held_out_contents(args.images, args.val_fraction, args.contents)
    contents = spaced(all_contents, args.max_contents)
    n_val_used = sum(1 for c in contents if all_contents.index(c) < n_val)
    styles = [Path(s) for s in args.styles]
    print(
        f"held out: {len(contents)} of {len(all_contents)} contents ({n_val_used} of the {n_val} validation photos of "
        f"{_rel(args.images)}, val_fraction {args.val_fraction}; {len(contents) - n_val_used} from {_rel(args.contents)}) "
        f"x {len(styles)} styles, long side {args.size}"
    )
    # Sheet rows: different contents (spread over the list), each with the next held-out style.
    n_rows = max(0, args.sheet_rows)
    row_contents = spaced(list(range(len(contents))), n_rows)
    if args.sheet_contents:  # e.g. only photos whose licence allows showing the sheet anywhere
        names = [c.name for c in contents]
        missing = [n for n in args.sheet_contents if n not in names]
        if missing:
            raise SystemExit(f"--sheet-contents: not among the held-out contents: {', '.join(missing)}")
        row_contents = [names.index(n) for n in args.sheet_contents]
        n_rows = len(row_contents)
    picks = [(row_contents[i % len(row_contents)], i % len(styles)) for i in range(n_rows)]

    results, images = evaluate(encoder, decoders, contents, n_val_used, styles, args, set(picks))
    keys = ["content_image"] + [d.key for d in decoders]
    summary = summarize(results, keys)
    by_split = {sp: summarize([r for r in results if r.split == sp], keys) for sp in ("val", "content") if any(r.split == sp for r in results)}
    eval_s = time.perf_counter() - t_start

    sheets = write_sheets(images, picks, contents, styles, decoders, args) if picks else {}

    speed_rows, speed_cmds, model_dir = [], [], None
    if not args.no_speed:
        model_dir = speed_model_folder(decoders[0], args, encoder)
        speed_rows, speed_cmds = measure_speed(model_dir, args, threads)

    print()
    print(f"### AdaIN decoder, held-out losses ({len(results)} pairs, long side {args.size}, alpha 1, encoder features of {_rel(args.encoder)}/4SE.pth)")
    print()
    print(loss_table(summary, labels, args.style_weight))
    print()
    print("Mean total loss per held-out style:")
    print()
    print(per_style_table(results, keys, labels))
    print()
    if speed_rows:
        print(f"### CPU speed of the trained model through `ultrastyle stylize` (model folder {_rel(model_dir)})")
        print()
        print(speed_table(speed_rows))
        print()
        for c in speed_cmds:
            print(f"    {c}")
        print()
        print(
            f"Timings are indicative only: wall-clock on a shared {os.cpu_count()}-CPU machine "
            f"(load average {os.getloadavg()[0]:.2f} at the end of the run)."
        )
    for k, v in sheets.items():
        if k != "jpeg_bytes":
            print(f"contact sheet ({k}): {v}" + (f" ({sheets['jpeg_bytes'] / 1e3:.0f} KB)" if k == "jpeg" else ""))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "adain_decoder_results.json"
    record = {
        "command": shlex.join(sys.argv if argv is None else [__file__, *argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
                 "loadavg_end": os.getloadavg()[0]},  # fmt: skip
        "settings": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v) for k, v in vars(args).items()},
        "decoders": [{"key": d.key, "label": d.label, "source": d.source, "step": d.step} for d in decoders],
        "warnings": notes,
        "held_out": {"contents": [_rel(c) for c in contents], "validation_photos": n_val_used, "styles": [_rel(s) for s in styles]},
        "summary": summary,
        "summary_by_split": by_split,
        "pairs": [vars(r) for r in results],
        "speed": speed_rows,
        "speed_commands": speed_cmds,
        "sheets": sheets,
        "seconds": {"losses": eval_s, "total": time.perf_counter() - t_start},
    }
    jpath.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"results: {_rel(jpath)}; {time.perf_counter() - t_start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
