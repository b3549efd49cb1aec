"""Distillation one level down: 64x students from the published 16x models, stages 1-5, by every method.

The 16x CD models (`../shared/models/cd-wct-16x`) are the teacher (``{k}SE``)
and its collaborator decoder (``{k}SD``); the student is ``cd64x`` (half the
16x widths, ~1/4 of the multiply-adds). For each stage and each method of
``--methods`` it trains, on the photos of `../shared/images/train` (10% held
out by file-name hash), with the same step budget and seed, two runs:

- ``{method}/{k}SE``: the student encoder, L1-pruned from the teacher (Q_k
  starting as the pruned channels' selection matrix; with ``--init fit``
  fitted to the teacher's activations instead, see `ultrastyle.distill.fit`), distilled by
  ``ultrastyle distill --kd {method}``:
  ``cd`` collaborator reconstruction (pixel + perceptual through the frozen 16x
  decoder) + beta * same-level embedding loss; ``mse`` the embedding loss
  only; ``review`` knowledge review (training-only ABF modules fuse the
  student's taps from the deepest down and predict every teacher tap, HCL loss;
  the embedding loss only fits Q_k); ``cd+review`` collaborator + review;
- ``{method}/{k}SD``: its own decoder (started from the 16x decoder pruned with
  Q_k folded into its first conv and its channels recalibrated, or with
  ``--init fit`` fitted to it; perceptual loss with the 16x teacher, as CD).

Then it reports, on the held-out photos (the validation split plus
`../shared/images/content`, long side ``--eval-size``), reconstruction PSNR /
SSIM per stage of the teacher (16x SE + SD), the untrained pruned student
through the teacher's decoder, the untrained fitted student (through its
fitted decoder and through the teacher's), every method's student through its own decoder
and through the teacher's decoder (D_T(Q_k F')), and the shipped
``ultrastyle-wct-64x`` (``--shipped``); the 5-stage WCT cascade at alpha 0
(levels 5,4,3,2,1: a pure reconstruction through all ten networks) of each
complete model, and each student's stylizations at ``--alpha`` (``--styles``
styles x ``--styled-photos`` photos) against the teacher's; parameter counts (encoder without Q_k, plus decoder) and CPU
seconds per megapixel (PyTorch eager, encoder + decoder, ``--threads``).

Everything lives in ``--work`` (default ``out/distill_64x``, git-ignored). Each
run checkpoints every ``--checkpoint-every`` steps and the script resumes
where it stopped: run the same command again after an interruption (Ctrl-C,
logout, kill) and at most one checkpoint interval is lost; finished runs are
skipped. ``--report-only`` only evaluates what exists; ``--train-only`` skips
the evaluation (e.g. two processes training different ``--methods`` into one
``--work``, then one ``--report-only``).

Full experiment on a GPU (a few thousand steps per stage take minutes there):

    .venv/bin/python benchmarks/distill_64x.py --device cuda --threads 0 --steps 3000 --sd-pixel-weight 4=1000,5=1000

Defaults: 3000 steps per run, batch 4 crops of 128 px, Adam with a 100-step
warm-up and cosine decay, lr 1e-3 for the student encoders (and ABF modules)
and 1e-4 for the decoders (decoder weights are ~10x smaller: 1e-3 made the
stage-1 decoder collapse), beta = 1 (CD's beta = 10 was tuned for a VGG-19
teacher; at this level it drowns the collaborator loss: 400-step probes at
stage 1 gave D_T(Q F') 15 dB with beta 10, 23 dB with 1, 30 dB with 0.1; at
stage 2, 16 / 19 dB with beta 0.1 / 1), review weight 1, pixel weight 1 (CD's;
the shipped students used 1e3-1e4, worth +0.5 to +2.2 dB at stages 2-5: at
this size a weight of 1 leaves the pixel term ~1000x under the perceptual
one), 1 torch thread plus 1 data worker.

Budget on a CPU: one step of the SE and SD runs of all five stages costs
about 1.6 s per method on one core of this 2-core machine when idle (stage 5:
0.55 s, stage 4: 0.4 s, stage 3: 0.28 s, stage 2: 0.2 s, stage 1: 0.1 s), so
3000 steps of four methods take about 5.5 CPU hours.

Smoke run (about 10 minutes; the warm-up must fit in the steps): ``--steps 6
--warmup-steps 1 --checkpoint-every 2 --work out/distill_64x_smoke --eval-size 128 --time-size 256``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ultrastyle.distill.config import DecoderConfig, DistillConfig
from ultrastyle.distill.data import CropSettings, CropStream, PairStream, list_images, readable_images, split_files
from ultrastyle.distill.fit import fit_decoder, fit_encoder
from ultrastyle.distill.jobs import TrainingInterrupted, calibration_crops, distill, train_decoder
from ultrastyle.distill.metrics import psnr, ssim
from ultrastyle.distill.outputs import OutputError
from ultrastyle.distill.prune import prune_encoder
from ultrastyle.distill.sources import load_decoder, load_encoder
from ultrastyle.distill.trainer import StepReport
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.core.arch import ARCHS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHIPPED = ROOT / "ultrastyle/models/weights/ultrastyle-wct-64x"
STUDENT = ARCHS["cd64x"]
METHODS = ("cd", "mse", "review", "cd+review")


def _done(path: Path, steps: int) -> bool:
    """A run's output exists and was trained for at least ``steps`` steps."""
    if not path.is_file():
        return False
    return int(torch.load(path, map_location="cpu", weights_only=True).get("step", 0)) >= steps


def _progress(label: str, every: int):
    state = {"t": time.perf_counter(), "step": None}

    def on_step(r: StepReport) -> None:
        if r.step % every and r.step != r.steps:
            return
        now = time.perf_counter()
        speed = ""
        if state["step"] is not None and r.step > state["step"]:
            rate = (now - state["t"]) / (r.step - state["step"])
            speed = f" ({rate:.2f} s/step, ~{rate * (r.steps - r.step) / 60:.0f} min left)"
        state["t"], state["step"] = now, r.step
        losses = " ".join(f"{k} {v:.4g}" for k, v in sorted(r.losses.items()))
        print(f"[{label}] step {r.step}/{r.steps} {losses}{speed}", flush=True)

    return on_step


def _runs(args: argparse.Namespace, k: int) -> list[tuple[str, object]]:
    common = dict(stage=k, images=str(args.images), crop=args.crop, resize=args.resize, batch_size=args.batch_size,
                  lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, pixel_weight=args.pixel_weight,
                  perceptual_weight=args.perceptual_weight, checkpoint_every=args.checkpoint_every, log_every=args.log_every, workers=args.workers,
                  seed=args.seed, val_fraction=args.val_fraction, threads=args.threads, device=args.device)  # fmt: skip
    teacher = str(args.teacher)
    runs: list[tuple[str, object]] = []
    for name in args.methods:
        out = str(args.work / name)
        steps = args.stage_steps.get(k, args.steps)  # every method: the same budget per stage
        # Each method gets the weights of the losses it has (a config refuses the others: they would be saved as if used).
        losses = {w: common[w] for w in ("pixel_weight", "perceptual_weight") if name in ("cd", "cd+review")}
        losses |= {"review_weight": args.review_weight} if name in ("review", "cd+review") else {}
        encoder_common = {key: v for key, v in common.items() if key not in ("pixel_weight", "perceptual_weight")}
        runs.append((f"{name}/{k}SE", DistillConfig(**encoder_common, **losses, out=out, steps=steps, lr=args.lr, teacher=teacher,
                                                      student_arch=STUDENT.name, init=args.init, beta=args.beta, kd=name)))  # fmt: skip
        sd = common | {"pixel_weight": args.sd_pixel_weight.get(k, args.pixel_weight)}
        runs.append((f"{name}/{k}SD", DecoderConfig(**sd, out=out, steps=args.stage_steps.get(k, args.sd_steps), lr=args.sd_lr, encoder=out,
                                                      loss_encoder=teacher, init=teacher, prune="fit" if args.init == "fit" else "l1")))  # fmt: skip
    return runs


def train(args: argparse.Namespace) -> bool:
    """Every run of every stage, skipping finished ones; False if interrupted."""
    for k in args.stages:
        for label, config in _runs(args, k):
            out = Path(config.out) / f"{k}{config.kind}.pth"
            if _done(out, config.steps):
                print(f"[{label}] done, skipped ({out})", flush=True)
                continue
            job = distill if config.kind == "SE" else train_decoder
            t0 = time.perf_counter()
            try:
                result = job(config, resume=True, on_step=_progress(label, args.checkpoint_every), on_message=lambda m, l=label: print(f"[{l}] {m}", flush=True))
            except OutputError as exc:  # weights of another run in the way (e.g. its run folder moved aside, not the weights)
                print(f"[{label}] refused: {exc}", flush=True)
                return False
            except TrainingInterrupted as exc:  # Ctrl-C: the checkpoint is written
                print(f"[{label}] interrupted at step {exc.result.train.step}; run the same command again to resume", flush=True)
                return False
            t = result.train
            print(f"[{label}] finished {t.steps} steps ({t.seconds / max(t.steps, 1):.2f} s/step over the run; "
                  f"this session {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    return True


# ---------------------------------------------------------------- evaluation


def _eval_images(args: argparse.Namespace) -> list[tuple[str, torch.Tensor]]:
    _, val = split_files(readable_images(list_images(args.images)), args.val_fraction)
    files = val + sorted((args.content).glob("*.jpg"))
    out = []
    for f in files:
        x = resize_long_side(load_image(f), args.eval_size)
        h, w = (x.shape[1] // 16) * 16, (x.shape[2] // 16) * 16  # the stage-5 grid: no padding rule needed
        out.append((f.name, x[:, :h, :w].contiguous()))
    return out


def _params(*nets: torch.nn.Module) -> int:
    return sum(p.numel() for n in nets for name, p in n.named_parameters() if "_aux" not in name)


def _seconds_per_mp(enc, dec, size: int, repeats: int = 3) -> float:
    x = torch.rand(1, 3, size, size)
    with torch.inference_mode():
        dec(enc(x))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dec(enc(x))
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / (size * size / 1e6)


def _quality(enc, dec, images: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
    ps, ss = [], []
    for _, x in images:
        y = dec(enc(x[None]))[0].clamp(0, 1)
        ps.append(psnr(y, x))
        ss.append(ssim(y, x))
    return {"psnr": statistics.mean(ps), "ssim": statistics.mean(ss)}


def _models(args: argparse.Namespace) -> dict[str, Path]:
    """Label -> model folder of every student set to evaluate (the methods' and the shipped one)."""
    out = {m: args.work / m for m in args.methods if (args.work / m).is_dir()}
    if args.shipped and args.shipped.is_dir():
        # The packaged folder has no architecture.json (the zoo names it): a copy that has one.
        import shutil

        from ultrastyle.core.arch import spec_to_dict

        copy = args.work / "shipped"
        copy.mkdir(parents=True, exist_ok=True)
        for f in args.shipped.glob("[1-5]S[ED].pth"):
            shutil.copyfile(f, copy / f.name)
        (copy / "architecture.json").write_text(json.dumps(spec_to_dict(STUDENT), indent=1) + "\n")
        out["shipped"] = copy
    return out


@torch.inference_mode()
def cascade(args: argparse.Namespace, images: list[tuple[str, torch.Tensor]]) -> tuple[dict[str, dict[str, float]], int]:
    """5-stage WCT cascade (levels 5..1) of the teacher and of every complete student model.

    At alpha 0 (a reconstruction: PSNR/SSIM against the photo) and, for the
    students, stylized at ``--alpha`` with the first ``--styles`` styles over
    the first ``--styled-photos`` held-out photos: PSNR/SSIM against the
    teacher's stylization of the same pair (does the student stylize like it?).
    Returns the figures per model and the number of stylized pairs.
    """
    from ultrastyle.models.pretrained import load_model
    from ultrastyle.runtime.cascade import stylize, style_statistics

    levels = (5, 4, 3, 2, 1)
    styles = [resize_long_side(load_image(f), args.eval_size) for f in sorted(args.style_dir.glob("*.jpg"))[: args.styles]]
    pairs = [(x, s) for _, x in images[: args.styled_photos] for s in styles]
    out: dict[str, dict[str, float]] = {}
    reference: list[torch.Tensor] = []  # the teacher's stylizations
    for label, folder in {"teacher": args.teacher, **_models(args)}.items():
        if not all((folder / f"{k}{p}.pth").is_file() for k in levels for p in ("SE", "SD")):
            continue
        model = load_model(folder, stages=levels, progress=False)
        ps, ss = [], []
        for _, x in images:
            # alpha 0: the style is ignored; its statistics only fill the argument
            y = stylize(model, x, style_statistics(model, x, levels), method="wct", alpha=0.0, levels=levels).clamp(0, 1)
            ps.append(psnr(y, x))
            ss.append(ssim(y, x))
        out[label] = {"psnr": statistics.mean(ps), "ssim": statistics.mean(ss)}
        styled = [stylize(model, x, style_statistics(model, s, levels), method="wct", alpha=args.alpha, levels=levels).clamp(0, 1)
                  for x, s in pairs]  # fmt: skip
        if label == "teacher":
            reference = styled
        elif reference:
            out[label] |= {"styled_psnr": statistics.mean(psnr(y, r) for y, r in zip(styled, reference)),
                           "styled_ssim": statistics.mean(ssim(y, r) for y, r in zip(styled, reference))}  # fmt: skip
    return out, len(pairs)


@torch.inference_mode()
def evaluate(args: argparse.Namespace) -> dict:
    images = _eval_images(args)
    train_files, _ = split_files(readable_images(list_images(args.images)), args.val_fraction)
    # the fitted start of --init fit sees the same calibration crops as the runs (the first FIT_CROPS of the stream)
    cal = calibration_crops(PairStream(CropStream(train_files, CropSettings(args.crop, args.resize), seed=args.seed)))
    report: dict = {"images": [n for n, _ in images], "eval_size": args.eval_size, "stages": {}}
    for k in args.stages:
        t_enc, t_dec = load_encoder(args.teacher, k), load_decoder(args.teacher, k)
        pruned = prune_encoder(t_enc, STUDENT)[0].eval()
        # F' -> Q_k F' where the teacher's decoder reads a student
        q = lambda enc: (lambda x: getattr(enc, f"conv{k}1_aux")(enc(x)))  # noqa: E731
        row: dict = {"teacher": _quality(t_enc, t_dec, images), "pruned+T": _quality(q(pruned), t_dec, images)}
        f_enc = fit_encoder(t_enc, STUDENT, cal)[0]
        f_dec = fit_decoder(t_dec, STUDENT, f_enc(cal), t_enc(cal))
        row |= {"fitted+T": _quality(q(f_enc), t_dec, images), "fitted": _quality(f_enc, f_dec, images)}
        student = None
        for label, folder in _models(args).items():
            if not (folder / f"{k}SE.pth").is_file():
                continue
            s_enc = load_encoder(folder, k, aux=True).float()
            row[f"{label}+T"] = _quality(q(s_enc), t_dec, images)
            if (folder / f"{k}SD.pth").is_file():
                s_dec = load_decoder(folder, k).float()
                row[label] = _quality(s_enc, s_dec, images)
                student = student or (s_enc, s_dec)
        info = {"teacher_params": _params(t_enc, t_dec), "teacher_s_per_mp": _seconds_per_mp(t_enc, t_dec, args.time_size)}
        if student is not None:
            info |= {"student_params": _params(*student), "student_s_per_mp": _seconds_per_mp(*student, args.time_size)}
        report["stages"][k] = {"quality": row, **info}
        print(f"[eval] stage {k}: " + ", ".join(f"{t} {v['psnr']:.2f}" for t, v in row.items()), flush=True)
    if set(args.stages) >= {1, 2, 3, 4, 5} or args.cascade:
        report["cascade"], report["styled_pairs"] = cascade(args, images)
        report["alpha"] = args.alpha
    return report


def _cell(q: dict, tag: str) -> str:
    return f"{q[tag]['psnr']:.2f} / {q[tag]['ssim']:.3f}" if tag in q else "-"


def markdown(report: dict) -> str:
    labels = list(dict.fromkeys(t for st in report["stages"].values() for t in st["quality"] if t not in ("teacher", "pruned+T", "fitted") and not t.endswith("+T")))
    lines = [f"Held-out photos: {len(report['images'])} ({', '.join(report['images'])}), long side {report['eval_size']} px.", ""]
    lines += ["Reconstruction PSNR (dB) / SSIM per stage: each student through its own decoder (own SD) and through the "
              "teacher's decoder via Q_k (teacher SD); gap = own SD - teacher.", ""]  # fmt: skip
    lines += ["| stage | model | own SD | teacher SD via Q | gap to teacher (dB) |", "|---|---|---|---|---|"]
    for k, st in report["stages"].items():
        q = st["quality"]
        lines.append(f"| {k} | teacher 16x SE+SD | {_cell(q, 'teacher')} | - | - |")
        lines.append(f"| {k} | pruned, untrained | - | {_cell(q, 'pruned+T')} | - |")
        if "fitted" in q:
            lines.append(f"| {k} | fitted, untrained | {_cell(q, 'fitted')} | {_cell(q, 'fitted+T')} | {q['fitted']['psnr'] - q['teacher']['psnr']:+.2f} |")
        for label in labels:
            gap = f"{q[label]['psnr'] - q['teacher']['psnr']:+.2f}" if label in q else "-"
            lines.append(f"| {k} | {label} | {_cell(q, label)} | {_cell(q, label + '+T')} | {gap} |")
    if report.get("cascade"):
        c = report["cascade"]
        lines += ["", "5-stage WCT cascade (levels 5,4,3,2,1), PSNR (dB) / SSIM: at alpha 0 against the photo; stylized "
                  f"({report.get('styled_pairs', '?')} content x style pairs, alpha {report.get('alpha', '?')}) against the teacher's stylization:", "",
                  "| model | alpha 0 | vs teacher (dB) | stylized vs teacher's |", "|---|---|---|---|"]  # fmt: skip
        for label, v in c.items():
            gap = f"{v['psnr'] - c['teacher']['psnr']:+.2f}" if "teacher" in c and label != "teacher" else "-"
            styled = f"{v['styled_psnr']:.2f} / {v['styled_ssim']:.3f}" if "styled_psnr" in v else "-"
            lines.append(f"| {label} | {v['psnr']:.2f} / {v['ssim']:.3f} | {gap} | {styled} |")
    lines += ["", "| stage | teacher params | student params | teacher s/MP | student s/MP |", "|---|---|---|---|---|"]
    for k, st in report["stages"].items():
        sp = f"{st['student_params']:,}" if "student_params" in st else "-"
        ss = f"{st['student_s_per_mp']:.3f}" if "student_s_per_mp" in st else "-"
        lines.append(f"| {k} | {st['teacher_params']:,} | {sp} | {st['teacher_s_per_mp']:.3f} | {ss} |")
    return "\n".join(lines) + "\n"


def publish(args: argparse.Namespace, dest: Path) -> None:
    """fp16 copies of the ``--publish-method`` student's SE (with Q_k) and SD, plus architecture.json, for the model zoo."""
    import hashlib

    from ultrastyle.distill.trainer import atomic_save

    src = args.work / args.publish_method
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for k in args.stages:
        for part in ("SE", "SD"):
            obj = torch.load(src / f"{k}{part}.pth", map_location="cpu", weights_only=True)
            atomic_save({"model": {n: v.half() for n, v in obj["model"].items()}, "step": obj["step"]}, dest / f"{k}{part}.pth")
    (dest / "architecture.json").write_text((src / "architecture.json").read_text())
    for f in sorted(dest.iterdir()):
        data = f.read_bytes()
        total += len(data)
        print(f"{f.name}\t{len(data)} bytes\tsha256 {hashlib.sha256(data).hexdigest()}")
    print(f"total {total / 1e6:.2f} MB in {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/distill_64x"), help="runs, weights and report (default: %(default)s)")
    ap.add_argument("--teacher", type=Path, default=SHARED / "models/cd-wct-16x")
    ap.add_argument("--images", type=Path, default=SHARED / "images/train")
    ap.add_argument("--content", type=Path, default=SHARED / "images/content", help="extra held-out photos")
    ap.add_argument("--stages", default="1,2,3,4,5")
    ap.add_argument("--steps", type=int, default=3000, help="steps per student encoder run")
    ap.add_argument("--sd-steps", type=int, default=None, help="steps per decoder run (default: --steps)")
    ap.add_argument("--stage-steps", default="", help="per-stage steps of every run of that stage, overriding --steps/--sd-steps, e.g. 4=1000,5=1000")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--resize", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the student encoders")
    ap.add_argument("--sd-lr", type=float, default=1e-4, help="Adam lr of the decoders (their weights are ~10x smaller)")
    ap.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--methods", default=",".join(METHODS), help="distillation methods to train and compare (default: %(default)s)")
    ap.add_argument("--init", default="fit", choices=["fit", "prune"], help="student start: fit (encoders and decoders fitted by least squares to the teacher's activations) or L1 pruning (decoders recalibrated)")
    ap.add_argument("--beta", type=float, default=1.0, help="embedding loss weight (CD used 10 with a VGG-19 teacher)")
    ap.add_argument("--review-weight", type=float, default=1.0, help="knowledge-review (HCL) loss weight")
    ap.add_argument("--pixel-weight", type=float, default=1.0)
    ap.add_argument("--perceptual-weight", type=float, default=1.0)
    ap.add_argument("--sd-pixel-weight", default="", help="per-stage pixel-loss weight of the decoder runs, e.g. 4=1000,5=1000 (default: --pixel-weight)")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training only; evaluation runs on the CPU)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine, 2 threads run several times slower under load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--style-dir", type=Path, default=SHARED / "images/style", help="styles of the cascade's stylized comparison")
    ap.add_argument("--styles", type=int, default=4, help="how many of --style-dir's styles (sorted by name)")
    ap.add_argument("--styled-photos", type=int, default=5, help="how many held-out photos are stylized with each style")
    ap.add_argument("--alpha", type=float, default=0.6, help="stylization strength of the stylized comparison (ultrastyle-wct-64x's default)")
    ap.add_argument("--time-size", type=int, default=1024, help="image side for the s/MP timing")
    ap.add_argument("--shipped", type=Path, default=SHIPPED, help="the shipped student model folder, evaluated beside (default: the packaged ultrastyle-wct-64x)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--cascade", action="store_true", help="evaluate the 5-stage cascade even when --stages names fewer (their weights must exist)")
    ap.add_argument("--train-only", action="store_true", help="train, skip the evaluation")
    ap.add_argument("--publish", type=Path, default=None, help="also write fp16 copies of one method's students here")
    ap.add_argument("--publish-method", default="cd", choices=METHODS)
    args = ap.parse_args()
    args.stages = [int(s) for s in args.stages.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        ap.error(f"--methods: choose among {', '.join(METHODS)}")
    args.sd_steps = args.sd_steps or args.steps
    try:
        args.stage_steps = {int(k): int(v) for k, v in (item.split("=") for item in args.stage_steps.split(",") if item)}
        args.sd_pixel_weight = {int(k): float(v) for k, v in (item.split("=") for item in args.sd_pixel_weight.split(",") if item)}
    except ValueError:
        ap.error("--stage-steps / --sd-pixel-weight: expected STAGE=VALUE[,STAGE=VALUE...]")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if not args.report_only and not train(args):
        sys.exit(130)
    if args.train_only:
        return
    report = evaluate(args)
    report["train_seconds_this_session"] = time.perf_counter() - t0
    report["settings"] = {k: str(v) for k, v in vars(args).items()}
    (args.work / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (args.work / "report.md").write_text(md)
    print(md)
    if args.publish:
        publish(args, args.publish)


if __name__ == "__main__":
    main()
