"""`ultrastyle distill` and `ultrastyle train-decoder`: the training half on the command line.

Thin typer layers over `ultrastyle.distill.jobs`. Every setting comes from a
flag or from ``--config FILE.yaml`` (flags win); a flag left out means "the
file's value, else the default". The resolved configuration is written beside
the checkpoints.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from collections.abc import Collection
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ultrastyle.cli import params
from ultrastyle.cli.logs import LogLines
from ultrastyle.cli.remedies import as_command
from ultrastyle.core.arch import parse_levels
from ultrastyle.distill.config import ConfigError, DecoderConfig, DistillConfig, RunConfig, resolve
from ultrastyle.models import zoo

if TYPE_CHECKING:
    from ultrastyle.distill.jobs import JobResult


class Mode(str, Enum):
    wct = "wct"
    adain = "adain"


class Kd(str, Enum):
    cd = "cd"
    review = "review"
    cd_review = "cd+review"
    mse = "mse"


class Prune(str, Enum):
    l1 = "l1"
    fit = "fit"


def _err(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {' '.join(message.split())}", style="red", markup=False)


def _stages(text: str | None) -> list[int | None]:
    if text is None:
        return [None]  # from the config file
    try:
        return list(dict.fromkeys(parse_levels(text)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stage") from None


def _config_text(exc: Exception, flags: dict[str, Any] | None = None, config_file: Path | None = None,
                 in_file: Collection[str] = ()) -> str:  # fmt: skip
    """A `ConfigError` line naming where its setting came from: the config file's key (one of ``in_file``, the flag not
    given), else the flag (``--device: ...``), which is also how to give a setting neither gave."""
    text = str(exc)
    key, _, rest = text.partition(": ")
    if text.endswith(": required"):  # a flag or a config key
        return f"{text}: give --{key.replace('_', '-')} (or {key}: in --config)"
    if not (key.isidentifier() and rest):
        return text
    if config_file is not None and key in {str(k).replace("-", "_") for k in in_file} and (flags or {}).get(key) is None:  # the file's
        return f"{config_file}: {key}: {rest}"
    return f"--{key.replace('_', '-')}: {rest}"


def _loss_text(losses: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in sorted(losses.items(), key=lambda kv: (kv[0] != "loss", kv[0])))


def _run_all(kind: str, cls: type[RunConfig], flags: dict[str, Any], config_file: Path | None, stage_text: str | None, resume: bool) -> None:
    """Resolve and run one job per stage, with a progress bar; exit codes: 1 error, 2 bad settings, 130 Ctrl-C."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    file_values: dict[str, Any] = {}
    try:
        if config_file is not None:
            from ultrastyle.distill.config import read_yaml

            file_values = read_yaml(config_file)
        if stage_text is None and isinstance(file_values.get("stage"), (str, list)):  # `stage: 1,2` or `[1, 2]`, as --stage takes
            given = file_values["stage"]
            if isinstance(given, list) and not all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in given):
                raise ConfigError(f"{config_file}: stage: expected stage numbers 1..5, got a list holding a "
                                  f"{type(next(k for k in given if not isinstance(k, (int, str)) or isinstance(k, bool))).__name__}")  # fmt: skip
            stage_text = ",".join(map(str, given)) if isinstance(given, list) else given
        stages = _stages(stage_text)
        configs = [resolve(cls, config_file, {**flags, "stage": k}) for k in stages]
        if len({c.resolved_run_dir() for c in configs}) < len(configs):  # from --run-dir or the file's run_dir
            raise ConfigError("run_dir: give one stage per run folder (or leave --run-dir out)")
        for c in configs:
            c.check(fresh=not (resume and c.has_saved_run()))  # a saved run resumes as it was saved
    except ConfigError as exc:
        _err(as_command(exc, _config_text(exc, {**flags, "stage": stage_text}, config_file, file_values)))
        raise typer.Exit(2) from None
    # Training is imported here, once the settings are checked: every `--help` builds these commands (typer), without torch.
    from ultrastyle.distill.config import CHECKPOINT
    from ultrastyle.distill.data import BadImageWarning, DataError
    from ultrastyle.distill.jobs import TrainingInterrupted, distill, train_decoder
    from ultrastyle.distill.outputs import OutputError
    from ultrastyle.distill.trainer import RunFolderInUse, StepReport, TrainingError
    from ultrastyle.models.convert import CheckpointError

    explicit = {**file_values, **{k: v for k, v in flags.items() if v is not None}}
    job = distill if kind == "SE" else train_decoder
    with Progress(
        TextColumn("[bold]{task.fields[name]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.description}"), console=err, transient=False,
        disable=LogLines(err).active,  # a log gets plain lines (`on_step`)
    ) as progress:  # fmt: skip
        for index, config in enumerate(configs):
            name = f"stage {config.stage} {kind}"
            bar = progress.add_task("", total=config.steps, name=name)
            lines = LogLines(err)

            def on_step(r: StepReport, bar: Any = bar, name: str = name, lines: LogLines = lines) -> None:
                progress.update(bar, completed=r.step, total=r.steps, description=_loss_text(r.losses))
                lines.say(f"{name}: step {r.step}/{r.steps} {_loss_text(r.losses)}{' (' + r.event + ')' if r.event else ''}",
                          milestone=bool(r.event) or r.step >= r.steps)  # fmt: skip

            def on_message(m: str) -> None:
                progress.console.print(m, markup=False, soft_wrap=True)

            # A typo in -o would go unnoticed; with weights there, the run refuses and says why.
            if resume and not (config.resolved_run_dir() / CHECKPOINT).exists() and not config.weights_file().exists():
                on_message(f"--resume: no checkpoint in {config.resolved_run_dir()}; starting from step 0")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # torch's
                    warnings.simplefilter("always", BadImageWarning)  # a photo that fails to decode mid-run: name it
                    warnings.showwarning = partial(_show_bad_image, on_message, os.getpid())
                    # The run folder's stage is compared on --resume too.
                    result = job(config, resume=resume, explicit={**explicit, "stage": config.stage}, on_step=on_step, on_message=on_message)  # type: ignore[arg-type]
            except (ConfigError, OutputError, RunFolderInUse) as exc:
                progress.stop()
                text = as_command(exc, _config_text(exc, flags, config_file, file_values) if isinstance(exc, ConfigError) else None)
                _err(text)
                raise typer.Exit(2) from None
            except (TrainingError, DataError, CheckpointError, zoo.ZooError, OSError) as exc:
                progress.stop()
                text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename and exc.strerror else as_command(exc)
                _err(text)
                raise typer.Exit(1) from None
            except TrainingInterrupted as exc:  # the step finished, a checkpoint written
                _report(progress.console, exc.result)
                progress.stop()
                raise typer.Exit(128 + (exc.result.train.signal or signal.SIGINT)) from None  # 130 for a Ctrl-C, 143 for SIGTERM
            except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
                progress.stop()
                run_dir = config.resolved_run_dir()
                if (run_dir / CHECKPOINT).exists():
                    _err(f"aborted; the last checkpoint in {run_dir} is intact: rerun with --resume")
                elif index:  # the stages before it hold checkpoints: a plain rerun is refused
                    _err(f"aborted before {name}'s training started; the stages before it are done: rerun with --resume")
                else:
                    _err("aborted before training started; no checkpoint was written (a rerun starts this stage again)")
                raise typer.Exit(130) from None
            _report(progress.console, result)


def _show_bad_image(on_message: Any, parent: int, message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    """`warnings.showwarning` for the run: one line per unreadable photo (data loader workers, forked, print it plainly)."""
    line = f"warning: {message}"
    if os.getpid() == parent:
        on_message(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _report(console: Console, r: JobResult) -> None:
    t = r.train
    if t.status == "interrupted":
        console.print(
            f"interrupted at step {t.step} of {t.steps}; checkpoint written to {r.run_dir / 'checkpoint.pt'}. "
            "Run the same command with --resume to continue.",
            style="yellow", markup=False, soft_wrap=True,
        )  # fmt: skip
        return
    if t.step > t.steps:  # --resume with fewer --steps than the run has done
        console.print(
            f"stage {r.config.stage} {r.config.kind}: the run was already at step {t.step}, past the {t.steps} asked; nothing was trained",
            style="yellow", markup=False, soft_wrap=True,
        )  # fmt: skip
    val = f"; validation {_loss_text(t.val)}" if t.val else ""
    wrote = ", ".join(str(p) for p in r.outputs) or "nothing new (already done)"
    setup = f" after {r.setup_seconds:.0f} s of set-up" if r.setup_seconds >= 1 else ""  # a fitted start takes minutes
    console.print(
        f"stage {r.config.stage} {r.config.kind}: {t.step} steps in {t.seconds:.0f} s{setup}{val}; wrote {wrote}; "
        f"log and plot in {r.run_dir}", markup=False, soft_wrap=True,
    )  # fmt: skip


# Shared options (None: "from --config, else the default").
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML file of settings (keys as the flag names); flags override it.")]
StageOpt = Annotated[Optional[str], typer.Option("--stage", help="Stage(s) 1..5, e.g. 4 or 1,2,3,4,5 (run one after another).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write {k}SE.pth and architecture.json into.")]
DecoderOutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Model folder to write {k}SD.pth (and {k}SE.pth when it has none) into.")]
ImagesOpt = Annotated[Optional[Path], typer.Option("--images", help="Folder of training photos (searched recursively).")]
StyleOpt = Annotated[Optional[Path], typer.Option("--style", help="Folder of style images (AdaIN mode).")]
ModeOpt = Annotated[Optional[Mode], typer.Option(case_sensitive=False, help="wct: reconstruction losses; adain: AdaIN style-transfer loss (needs --style).")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Checkpoints, log.csv, losses.png, config.yaml", show_default="OUT/runs/{k}SE or {k}SD")]
CropOpt = Annotated[Optional[int], typer.Option(help="Random crop side in pixels", show_default="256")]
ResizeOpt = Annotated[Optional[int], typer.Option(help="Resize each photo's short side to this before cropping; 0 keeps it", show_default="300")]
ValFracOpt = Annotated[Optional[float], typer.Option("--val-fraction", help="Share of the photos held out for validation", show_default="0.1")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Crops per step", show_default="4")]
StepsOpt = Annotated[Optional[int], typer.Option(help="Optimizer steps; may be raised on --resume.", show_default="2000")]
LrOpt = Annotated[Optional[float], typer.Option(help="Adam learning rate", show_default="1e-4")]
WarmupOpt = Annotated[Optional[int], typer.Option("--warmup-steps", help="Linear learning-rate ramp over the first steps", show_default="0")]
LrScheduleOpt = Annotated[Optional[str], typer.Option("--lr-schedule", help="constant, or cosine (a half cosine from --lr down towards lr/100 over --steps)", show_default="constant")]
CkptOpt = Annotated[Optional[int], typer.Option("--checkpoint-every", help="Steps between checkpoints", show_default="200")]
LogOpt = Annotated[Optional[int], typer.Option("--log-every", help="Steps per CSV row", show_default="10")]
ValOpt = Annotated[Optional[int], typer.Option("--val-every", help="Steps between validations; 0: at checkpoints", show_default="0")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Data loader worker processes", show_default="2")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of the crops (and of a random init)", show_default="0")]
DeviceOpt = Annotated[Optional[str], typer.Option(metavar=params.DEVICE_METAVAR, parser=params.device, help="Where to train: the CPU, or a CUDA GPU (cuda:N: the N-th)", show_default="cpu")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="PyTorch threads; 0: PyTorch's default", show_default="0")]
PixelOpt = Annotated[Optional[float], typer.Option("--pixel-weight", help="WCT mode: weight of the pixel loss (CD's 1; the 64x students used 1e3-1e4, +0.5 to +2.2 dB reconstruction PSNR, docs/training.md)", show_default="1")]
PercOpt = Annotated[Optional[float], typer.Option("--perceptual-weight", help="WCT mode: weight of the perceptual loss", show_default="1")]
ContentOpt = Annotated[Optional[float], typer.Option("--content-weight", help="AdaIN mode: content loss weight", show_default="1")]
StyleWOpt = Annotated[Optional[float], typer.Option("--style-weight", help="AdaIN mode: style loss weight", show_default="10")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the run folder's checkpoint (same settings; --steps may grow).")]


def _common(**kw: Any) -> dict[str, Any]:
    out = {}
    for k, v in kw.items():
        if isinstance(v, Enum):
            v = v.value
        elif isinstance(v, Path):
            v = str(v)
        out[k] = v
    return out


def distill_command(
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Teacher: zoo name, model folder ({k}SE.pth) or a VGG-19 .pth file.")] = None,
    stage: StageOpt = None,
    out: OutOpt = None,
    images: ImagesOpt = None,
    collaborator: Annotated[Optional[str], typer.Option(help="Model with the collaborator decoder {k}SD.pth", show_default="the teacher")] = None,
    student_arch: Annotated[Optional[str], typer.Option("--student-arch", help="Registered student architecture (e.g. cd64x)", show_default="teacher widths x --width-factor")] = None,
    width_factor: Annotated[Optional[float], typer.Option("--width-factor", help="Student width / teacher width", show_default="0.5")] = None,
    init: Annotated[Optional[str], typer.Option(help="fit (the teacher's channels that span the rest, refitted by least squares to its activations), prune (L1 filter pruning of the teacher), random, or a folder/.pth with the student's weights", show_default="fit")] = None,
    kd: Annotated[Optional[Kd], typer.Option("--kd", case_sensitive=False, help="Distillation method. cd: collaborator decoder through Q_k + beta * same-level embedding loss; review: knowledge review (ABF fusion from the deepest tap down, hierarchical context loss against every teacher tap); cd+review: both; mse: embedding loss only.", show_default="cd")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Weight of the embedding loss sum_k ||F_k - Q_k F'_k||^2 (with review it only fits Q_k)", show_default="10")] = None,
    review_weight: Annotated[Optional[float], typer.Option("--review-weight", help="Weight of the knowledge-review loss (--kd review, cd+review)", show_default="1")] = None,
    review_width: Annotated[Optional[int], typer.Option("--review-width", help="Channels of the training-only fusion (ABF) maps; 0: the student's deepest width", show_default="0")] = None,
    collaborate: Annotated[Optional[bool], typer.Option("--collaborate/--no-collaborate", help="--no-collaborate: the same as --kd mse (older spelling).")] = None,
    mode: ModeOpt = None, style: StyleOpt = None, run_dir: RunDirOpt = None, crop: CropOpt = None, resize: ResizeOpt = None,
    val_fraction: ValFracOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, lr: LrOpt = None, lr_schedule: LrScheduleOpt = None, warmup_steps: WarmupOpt = None,
    checkpoint_every: CkptOpt = None, log_every: LogOpt = None, val_every: ValOpt = None, workers: WorkersOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None, pixel_weight: PixelOpt = None,
    perceptual_weight: PercOpt = None, content_weight: ContentOpt = None, style_weight: StyleWOpt = None,
    config: ConfigOpt = None, resume: ResumeOpt = False,
) -> None:  # fmt: skip
    """Distill a thin student encoder from a teacher (Collaborative Distillation and/or knowledge review).

    ultrastyle distill -t cd-wct-16x --stage 1,2,3,4,5 --images photos/ -o my-64x/ [--kd review]

    --kd cd (default): collaborator reconstruction through D(Q_k F'_k) + beta * sum_k ||F_k - Q_k F'_k||^2.
    --kd review / cd+review: the student's taps, fused from the deepest tap down by
    training-only attention modules, must predict every teacher tap (hierarchical
    context loss, --review-weight); the deployed student is the same network.
    Writes OUT/{k}SE.pth (with the Q_k layers) once all steps are done; train
    its decoder next with `ultrastyle train-decoder --encoder OUT`.
    """
    flags = _common(
        teacher=teacher, out=out, images=images, collaborator=collaborator, student_arch=student_arch,
        width_factor=width_factor, init=init, beta=beta, kd=kd, review_weight=review_weight, review_width=review_width,
        collaborate=collaborate, mode=mode, style=style,
        run_dir=run_dir, crop=crop, resize=resize, val_fraction=val_fraction, batch_size=batch_size, steps=steps,
        lr=lr, lr_schedule=lr_schedule and lr_schedule.lower(), warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, log_every=log_every, val_every=val_every, workers=workers,
        seed=seed, device=device, threads=threads, pixel_weight=pixel_weight, perceptual_weight=perceptual_weight,
        content_weight=content_weight, style_weight=style_weight,
    )  # fmt: skip
    _run_all("SE", DistillConfig, flags, config, stage, resume)


def train_decoder_command(
    encoder: Annotated[Optional[str], typer.Option("--encoder", "-e", help="Encoder whose features are decoded: zoo name, model folder or VGG-19 .pth.")] = None,
    stage: StageOpt = None,
    out: DecoderOutOpt = None,
    images: ImagesOpt = None,
    loss_encoder: Annotated[Optional[str], typer.Option("--loss-encoder", help="Network of the perceptual loss, e.g. the teacher for a student's decoder", show_default="the encoder")] = None,
    init: Annotated[Optional[str], typer.Option(help="random, or a model with {k}SD.pth to start from (pruned to the encoder's widths if wider)", show_default="random")] = None,
    prune: Annotated[Optional[Prune], typer.Option(case_sensitive=False, help="How a wider --init decoder is thinned: fit (least squares to its activations on its own encoder's features; needs the --init model's encoder) or l1 (filter norms, recalibrated)", show_default="fit")] = None,
    mode: ModeOpt = None, style: StyleOpt = None, run_dir: RunDirOpt = None, crop: CropOpt = None, resize: ResizeOpt = None,
    val_fraction: ValFracOpt = None, batch_size: BatchOpt = None, steps: StepsOpt = None, lr: LrOpt = None, lr_schedule: LrScheduleOpt = None, warmup_steps: WarmupOpt = None,
    checkpoint_every: CkptOpt = None, log_every: LogOpt = None, val_every: ValOpt = None, workers: WorkersOpt = None,
    seed: SeedOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None, pixel_weight: PixelOpt = None,
    perceptual_weight: PercOpt = None, content_weight: ContentOpt = None, style_weight: StyleWOpt = None,
    config: ConfigOpt = None, resume: ResumeOpt = False,
) -> None:  # fmt: skip
    """Train the decoder of an encoder: a teacher's collaborator, or a distilled student's own decoder.

    ultrastyle train-decoder -e my-64x/ --loss-encoder cd-wct-16x --init cd-wct-16x --stage 1,2,3,4,5 --images photos/ -o my-64x/

    Writes OUT/{k}SD.pth (and OUT/{k}SE.pth if missing), so OUT loads as a
    model: `ultrastyle stylize --model OUT`, `ultrastyle export OUT`.
    """
    flags = _common(
        encoder=encoder, out=out, images=images, loss_encoder=loss_encoder, init=init, prune=prune, mode=mode, style=style,
        run_dir=run_dir, crop=crop, resize=resize, val_fraction=val_fraction, batch_size=batch_size, steps=steps,
        lr=lr, lr_schedule=lr_schedule and lr_schedule.lower(), warmup_steps=warmup_steps, checkpoint_every=checkpoint_every, log_every=log_every, val_every=val_every, workers=workers,
        seed=seed, device=device, threads=threads, pixel_weight=pixel_weight, perceptual_weight=perceptual_weight,
        content_weight=content_weight, style_weight=style_weight,
    )  # fmt: skip
    _run_all("SD", DecoderConfig, flags, config, stage, resume)
