"""Whole training jobs: a resolved config in, trained weights in a model folder out.

`distill` trains a student encoder ``{k}SE.pth``; `train_decoder` trains a
decoder ``{k}SD.pth`` (the teacher's collaborator, or the student's own SD).
Both build data and networks from the config, run the `Trainer` in
``config.resolved_run_dir()`` and, once all steps are done, write the trained
network into ``config.out`` (see `outputs`). The CLI and the benchmark are
thin layers over these two functions.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ultrastyle.core.arch import ARCHS, ArchSpec, get_arch, spec_to_dict
from ultrastyle.distill import sources
from ultrastyle.distill.config import (
    CHECKPOINT,
    CONFIG_FILE,
    ConfigError,
    DecoderConfig,
    DistillConfig,
    RunConfig,
    for_resume,
    read_saved,
    write_yaml,
)
from ultrastyle.distill.data import (
    CenterCrops,
    CropSettings,
    CropStream,
    DataError,
    PairStream,
    decodable_from,
    list_images,
    readable_images,
    split_files,
)
from ultrastyle.distill.fit import fit_decoder, fit_encoder
from ultrastyle.distill.outputs import OutputError, claim_folder, record_adain_stage, write_network
from ultrastyle.distill.prune import prune_decoder, prune_encoder
from ultrastyle.distill.review import ReviewHead
from ultrastyle.distill.tasks import DecoderTask, StudentEncoderTask
from ultrastyle.distill.trainer import StepReport, Trainer, TrainOptions, TrainResult, refuse_overwrite
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.models import convert, zoo
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.options import unwritable_folder


def _warnings_only(message: str) -> None:
    """The default ``on_message``: its warnings as Python warnings (an image skipped, a decoder to train again); notes dropped."""
    if message.startswith("warning: "):
        warn(message.removeprefix("warning: "))


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run: the step finished and a checkpoint was written; ``result`` says where. The same
    call with ``resume=True`` continues it."""

    def __init__(self, result: JobResult) -> None:
        t = result.train
        super().__init__(f"interrupted at step {t.step} of {t.steps}; checkpoint written to {result.run_dir / CHECKPOINT}: the same "
                         "call with resume=True continues it")  # fmt: skip
        self.result = result


@dataclass
class JobResult:
    config: RunConfig
    run_dir: Path
    train: TrainResult
    outputs: list[Path]  # files written into config.out (empty unless the run finished)
    setup_seconds: float = 0.0  # before the first step: data, networks, a fitted start (`train.seconds` is the steps')


# ---------------------------------------------------------------- architectures


def _same_dims(a: ArchSpec, b: ArchSpec) -> bool:
    return dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


def student_spec(teacher: ArchSpec, arch: str | None = None, width_factor: float = 0.5) -> ArchSpec:
    """The student architecture: ``arch`` by name, or the teacher's widths x ``width_factor``.

    A derived architecture takes the name of a registered one with the same
    widths (cd16x x 0.5 is ``cd64x``). The student's Q_k must map onto the
    teacher's widths; a named architecture that does not is refused.
    """
    if arch:
        try:
            spec = get_arch(arch)
        except KeyError as exc:
            raise ConfigError(f"student_arch: {exc.args[0]}") from None
        for k in (1, 2, 3, 4, 5):
            for b in range(1, k + 1):
                conv = f"conv{b}1"
                if spec.teacher_widths is None:
                    raise ConfigError(f"student_arch: {spec.name} is a teacher's architecture (it has no Q_k embeddings); give a student "
                                      f"architecture made for {teacher.name}, or leave student_arch out to scale its widths (width_factor)")  # fmt: skip
                if spec.teacher_width(k, conv) != teacher.width(k, conv):
                    raise ConfigError(
                        f"student_arch: {spec.name} is a student of another teacher: its Q_k embeddings map stage {k} {conv} to "
                        f"{spec.teacher_width(k, conv)} channels, and {teacher.name} has {teacher.width(k, conv)}; give a student "
                        f"architecture made for {teacher.name}, or leave student_arch out to scale its widths (width_factor)"
                    )
        return spec
    spec = teacher.student(f"{teacher.name}-x{width_factor:g}", width_factor)
    return next((a for a in ARCHS.values() if _same_dims(a, spec)), spec)


# ---------------------------------------------------------------- data


def _listed(setting: str, folder: str) -> list[Path]:
    """The folder's images; a missing or empty folder is a setting that cannot be used (before any work)."""
    try:
        return list_images(folder)
    except DataError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def _data(config: RunConfig, warn: Callable[[str], None]) -> tuple[PairStream, CenterCrops | None, dict[str, Any]]:
    settings = CropSettings(config.crop, config.resize)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = readable_images(_listed("images", config.images), min_side=1)
        styles = readable_images(_listed("style", config.style), min_side=1) if config.mode == "adain" and config.style else []
    for w in caught:
        warn(f"warning: {w.message}")
    if not files:
        raise ConfigError(f"images: no image in {config.images} can be read (see the warnings above); give a folder of photos")
    train, val = split_files(files, config.val_fraction)
    # Decoded before the run folder is written: one whose training images all fail stopped in its data loader, and
    # blocked a rerun. The training side's: validation images that fail are left out of validation (`CenterCrops`).
    (train, bad_files), (styles, bad_styles) = decodable_from(train), decodable_from(styles)
    for message in bad_files + bad_styles:
        warn(f"warning: {message}")
    if not train:
        readable = "no image" if not val else f"none of the {len(bad_files)} training images (the other {len(val)} are for validation)"
        raise remedied(ConfigError(f"images: {readable} in {config.images} can be read (see the warnings above); give a folder of "
                                   "photos" + (", or val_fraction=0 to train on every image" if val else "")),
                       Setting("val_fraction", 0) if val else None)  # fmt: skip
    if config.mode == "adain" and config.style and not styles:
        raise ConfigError(f"style: no image in {config.style} can be read (see the warnings above); give a folder of style images")
    style_stream = CropStream(styles, settings, seed=config.seed + 1) if styles else None
    stream = PairStream(CropStream(train, settings, seed=config.seed), style_stream)
    val_data = CenterCrops(val, settings, styles[: len(val)]).readable(lambda m: warn(f"warning: {m}")) if val else None
    # Headers read, the first training image decoded: one that fails later is replaced by another (`data.CropStream`).
    facts = {"train_images": len(train), "val_images": len(val_data.files) if val_data else 0, "style_images": len(styles)}
    return stream, val_data, facts


# ---------------------------------------------------------------- networks


FIT_CROPS = 32  # calibration crops of a fitted init (64 crops of 256 px gave the same quality within 0.1-0.6 dB at stages 1-3)


def calibration_crops(stream: PairStream, n: int = FIT_CROPS) -> torch.Tensor:
    """The first ``n`` training crops (N, 3, crop, crop): what a fitted or recalibrated init sees."""
    return torch.stack([stream[g]["content"] for g in range(n)])


def _student_init(config: DistillConfig, teacher: Encoder, spec: ArchSpec, stream: PairStream,
                  on_message: Callable[[str], None]) -> Encoder:  # fmt: skip
    k = config.stage
    if config.init == "prune":
        return prune_encoder(teacher, spec)[0]
    if config.init == "fit":
        on_message(f"stage {k} SE: fitting the student to the teacher's activations (least squares; the deep stages take minutes on a CPU)")
        with torch.no_grad():
            return fit_encoder(teacher, spec, calibration_crops(stream))[0]
    if config.init == "random":
        torch.manual_seed(config.seed)
        return Encoder(spec, k, aux=True)
    path = Path(config.init)
    if is_zoo_name(config.init) or not path.exists():  # a zoo model's folder (`sources`); anything else names what init takes
        try:
            path = sources.model_folder(config.init)
        except zoo.UnknownModelError:  # a path that is not there says so itself
            raise ConfigError(f"init: {config.init!r} is none of fit, prune, random, a model folder, a weight file or a zoo model") from None
    if path.is_dir():  # a student folder, or CD's pruned base (e{k}_base.pth)
        candidates = [path / f"{k}SE.pth", path / f"e{k}_base.pth"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    return convert.cd_encoder(path, k, spec=spec, aux=True)


def _review_head(config: DistillConfig, teacher: Encoder, student: Encoder) -> ReviewHead:
    """The ABF modules of a knowledge-review run, initialised from ``config.seed`` (the global RNG is left alone)."""
    k = config.stage
    widths = [getattr(student, f"conv{b}1").out_channels for b in range(1, k + 1)]
    t_widths = [getattr(teacher, f"conv{b}1").out_channels for b in range(1, k + 1)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ReviewHead(widths, t_widths, config.review_width)


CALIBRATION_CROPS = 16


def _decoder_init(config: DecoderConfig, encoder: Encoder, spec: ArchSpec, stream: PairStream,
                  on_message: Callable[[str], None]) -> Decoder:  # fmt: skip
    """Random, or a decoder to start from: copied if it has ``spec``'s widths, else pruned to them.

    A pruned start (``config.prune`` l1) reads the encoder's features through
    its Q_k (when it has one) and is calibrated on the first
    `CALIBRATION_CROPS` training crops (see `prune.prune_decoder`); a fitted
    one (fit) is fitted on the first `FIT_CROPS` to the wider decoder reading
    its own encoder's features (see `fit.fit_decoder`).
    """
    k = config.stage
    if config.init == "random":
        torch.manual_seed(config.seed)
        return Decoder(spec, k)
    path = Path(config.init)
    if not is_zoo_name(config.init) and path.is_file():  # one decoder file of this very architecture: a warm start
        return convert.cd_decoder(path, k, spec=spec)
    if is_zoo_name(config.init):
        path = sources.model_folder(config.init)  # installed on first use; not a folder of that name here
    if path.is_dir() and not (path / f"{k}SD.pth").is_file() and (path / f"d{k}_base.pth").is_file():
        start = convert.cd_decoder(path / f"d{k}_base.pth", k, spec=sources.source_arch(path))  # CD's pruned base
    else:
        start = sources.load_decoder(config.init, k)
    if _same_dims(dataclasses.replace(start.spec, teacher_widths=None, teacher_overrides={}),
                  dataclasses.replace(spec, teacher_widths=None, teacher_overrides={})):  # fmt: skip
        dec = Decoder(spec, k)
        dec.load_state_dict(start.state_dict())
        return dec
    target = Decoder(spec, k).state_dict()
    if narrow := [n for n, v in start.state_dict().items() if n in target and any(a < b for a, b in zip(v.shape, target[n].shape))]:
        raise ConfigError(f"init: {config.init}'s stage-{k} decoder is narrower than the encoder's ({narrow[0]}: "
                          f"{tuple(start.state_dict()[narrow[0]].shape)}, needs {tuple(target[narrow[0]].shape)}); a start is "
                          "copied or thinned, never widened: give a decoder at least as wide, or init random")  # fmt: skip
    if config.prune == "fit":
        if path.is_dir() and not (path / f"{k}SE.pth").is_file():
            raise remedied(ConfigError(f"prune: fit needs the encoder of the decoder it thins, {path / f'{k}SE.pth'}, and there is none; "
                                       "give prune='l1'"), Setting("prune", "l1"))  # fmt: skip
        on_message(f"stage {k} SD: fitting the start decoder to {config.init}'s activations (least squares; the deep stages take minutes on a CPU)")
        with torch.no_grad():
            images = calibration_crops(stream)
            return fit_decoder(start, spec, encoder(images), sources.load_encoder(config.init, k)(images))
    # A wider decoder (the teacher's collaborator): prune it, reading the
    # student's features through the encoder's Q_k where it has one.
    embed = getattr(encoder, f"conv{k}1_aux", None)
    if embed is not None and embed.out_channels != start.in_channels:
        embed = None
    feats = None
    if embed is not None:
        with torch.no_grad():
            feats = encoder(calibration_crops(stream, CALIBRATION_CROPS))
    return prune_decoder(start, spec, embed=embed, calibrate=feats)


# ---------------------------------------------------------------- runs


def _resumes(config: RunConfig, resume: bool) -> bool:
    """Whether the run continues from a checkpoint, whose weights replace any start."""
    return resume and (config.resolved_run_dir() / CHECKPOINT).is_file()


def _prepare_run(config: RunConfig, explicit: Mapping[str, Any] | None, resume: bool, on_message: Callable[[str], None]) -> RunConfig:
    """The config to run: on resume, the saved one (with resumable changes); else ``config``, checked."""
    run_dir = config.resolved_run_dir()
    saved = run_dir / CONFIG_FILE
    resuming = resume and config.has_saved_run()
    config.check(fresh=not resuming)  # a saved run resumes as it was saved (rules added since do not lock it out)
    refuse_overwrite(run_dir, resume)  # before anything is loaded or config.yaml is rewritten
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise OutputError(f"{config.out}: is a file; the output is a model folder (new, or holding this architecture's weights)")
    if why := unwritable_folder(Path(config.out)):  # found before the start is fitted (minutes), not after
        raise remedied(OutputError(f"{why}; it cannot be the model folder: give another (out)"), Setting("out"))
    if config.run_dir:  # a folder of the caller's choosing: usable before the model folder is claimed
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise remedied(OutputError(f"{run_dir}: cannot be the run folder ({exc.strerror}); give another folder (run_dir)"),
                           Setting("run_dir")) from None  # fmt: skip
    written = config.weights_file()
    if written.is_file() and not (run_dir / CHECKPOINT).is_file():  # its run folder may be gone; the weights are still someone's work
        raise remedied(OutputError(
            f"{written} holds trained weights already, and {run_dir} has no checkpoint to resume: a run would start from step 0 and "
            "replace them; move the file away, or write into another model folder (out)"
        ), Setting("out"))
    if resuming:
        given = explicit if explicit is not None else dataclasses.asdict(config)
        before = read_saved(type(config), saved)
        config = for_resume(before, config, given)
        config.check(fresh=False)
        if config.lr_schedule == "cosine" and config.steps != before.steps:
            on_message(f"warning: the cosine schedule spans all the steps: resumed with {config.steps} steps (the run was started with "
                       f"{before.steps}), the learning rate jumps from the old schedule to the new one at the step the run resumes from")  # fmt: skip
    return config


def _options(config: RunConfig) -> TrainOptions:
    return TrainOptions(
        steps=config.steps, lr=config.lr, lr_schedule=config.lr_schedule, warmup_steps=config.warmup_steps, batch_size=config.batch_size, checkpoint_every=config.checkpoint_every,
        log_every=config.log_every, val_every=config.val_every, workers=config.workers, device=config.device,
    )  # fmt: skip


def distill(
    config: DistillConfig,
    *,
    resume: bool = False,
    explicit: Mapping[str, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> JobResult:
    """Train the stage-``config.stage`` student encoder by ``config.method`` (Collaborative Distillation by default).

    With ``resume``, the run folder's saved settings are used; ``explicit``
    names the settings the caller chose (default: every field of ``config``):
    those must match the saved ones, except the resumable ones (``steps``,
    ``device``, ...; see `config.for_resume`), which are taken from ``config``.
    ``on_message`` receives one-line notes (skipped images, where things go).
    """
    started = time.perf_counter()
    on_message = on_message or _warnings_only
    config = _prepare_run(config, explicit, resume, on_message)
    with _threads(config.threads):
        return _distill(config, resume, on_step, on_message, started)


def _distill(config: DistillConfig, resume: bool, on_step: Callable[[StepReport], None] | None, on_message: Callable[[str], None],
             started: float) -> JobResult:  # fmt: skip
    k = config.stage
    data = _data(config, on_message)
    with _source("teacher"):
        teacher = sources.load_encoder(config.teacher, k)
    spec = student_spec(teacher.spec, config.student_arch, config.width_factor)
    with _source("collaborator" if config.collaborator else "teacher"):
        decoder = sources.load_decoder(config.collaborator or config.teacher, k) if config.collaborates else None
    if decoder is not None and decoder.in_channels != teacher.out_channels:
        setting = "collaborator" if config.collaborator else "teacher"
        raise ConfigError(f"{setting}: the stage-{k} decoder of {config.collaborator or config.teacher} reads {decoder.in_channels} "
                          f"channels, and the teacher's stage-{k} encoder gives {teacher.out_channels}; the collaborator is the "
                          "decoder trained for the teacher: give the teacher's model (or leave collaborator out when it has one)")  # fmt: skip
    with _source("init"):  # a resumed checkpoint replaces the start: not fitted again (a minute at stage 5)
        student = Encoder(spec, k, aux=True) if _resumes(config, resume) else _student_init(config, teacher, spec, data[0], on_message)
    review = _review_head(config, teacher, student) if config.reviews else None
    task = StudentEncoderTask(
        teacher, student, decoder, beta=config.beta, review=review, review_weight=config.review_weight,
        mode=config.mode,  # type: ignore[arg-type]
        pixel_weight=config.pixel_weight, perceptual_weight=config.perceptual_weight,
        content_weight=config.content_weight, style_weight=config.style_weight,
    )  # fmt: skip
    return _run(config, task, spec, data, resume, on_step, on_message, {"teacher_architecture": spec_to_dict(teacher.spec)}, started)


def train_decoder(
    config: DecoderConfig,
    *,
    resume: bool = False,
    explicit: Mapping[str, Any] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> JobResult:
    """Train the stage-``config.stage`` decoder of ``config.encoder`` (collaborator or student decoder).

    The output folder also receives the encoder as ``{k}SE.pth`` when it has
    none, so that it is a complete model (e.g. for a VGG-19 teacher file).
    """
    started = time.perf_counter()
    on_message = on_message or _warnings_only
    config = _prepare_run(config, explicit, resume, on_message)
    with _threads(config.threads):
        return _train_decoder(config, resume, on_step, on_message, started)


def _train_decoder(config: DecoderConfig, resume: bool, on_step: Callable[[StepReport], None] | None,
                   on_message: Callable[[str], None], started: float) -> JobResult:  # fmt: skip
    k = config.stage
    data = _data(config, on_message)
    with _source("encoder"):
        spec = sources.source_arch(config.encoder)
        encoder = sources.load_encoder(config.encoder, k, aux=None)  # keep Q_k if it has them (to fold into a pruned init)
    _refuse_another_encoder(config, encoder)
    with _source("loss_encoder"):
        loss_encoder = sources.load_encoder(config.loss_encoder, k) if config.loss_encoder else None
    with _source("init"):
        decoder = Decoder(spec, k) if _resumes(config, resume) else _decoder_init(config, encoder, spec, data[0], on_message)
    task = DecoderTask(
        encoder, decoder, loss_encoder=loss_encoder, mode=config.mode,  # type: ignore[arg-type]
        pixel_weight=config.pixel_weight, perceptual_weight=config.perceptual_weight,
        content_weight=config.content_weight, style_weight=config.style_weight,
    )  # fmt: skip
    result = _run(config, task, spec, data, resume, on_step, on_message, {}, started)
    if result.outputs and not (Path(config.out) / f"{k}SE.pth").is_file():
        result.outputs.append(write_network(config.out, f"{k}SE.pth", encoder))
    if result.outputs and config.mode == "adain":  # the folder stylizes with adain by default
        result.outputs.append(record_adain_stage(config.out, k))
    return result


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` (0: left as they are) for one job (the resumed run's setting, where a
    resume does not give it again), then put back."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _source(setting: str) -> Iterator[None]:
    """Weights that cannot be found or read from ``setting``'s value: a `ConfigError` naming the setting (before training)."""
    try:
        yield
    except (convert.CheckpointError, zoo.ZooError) as exc:
        raise remedied(ConfigError(f"{setting}: {exc}"), getattr(exc, "remedy", None)) from exc


def _refuse_another_encoder(config: DecoderConfig, encoder: Encoder) -> None:
    """`OutputError` where the output folder holds a stage encoder other than ``encoder``: the decoder would not fit it."""
    k = config.stage
    there = Path(config.out) / f"{k}SE.pth"
    if not there.is_file() or (Path(config.encoder).is_dir() and Path(config.encoder).resolve() == Path(config.out).resolve()):
        return
    with _source("out"):
        theirs = sources.load_encoder(config.out, k, aux=None).state_dict()
    ours = encoder.state_dict()
    if theirs.keys() != ours.keys() or any(not torch.equal(theirs[n], ours[n]) for n in ours):
        raise remedied(OutputError(
            f"{there} is another encoder than {config.encoder}'s stage {k}, which the decoder is trained for: the folder would pair "
            "them; write into another model folder (out), or train for the encoder that is there (encoder)"
        ), (Setting("out"), Setting("encoder")))


def _written_at(path: Path, step: int) -> bool:
    """Whether ``path`` holds the weights of step ``step`` already (a finished run resumed: nothing to write, or to warn of)."""
    if not path.is_file():
        return False
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("step", -1)) == step
    except Exception:  # noqa: BLE001 - unreadable: written again
        return False


def _run(
    config: RunConfig,
    task: StudentEncoderTask | DecoderTask,
    spec: ArchSpec,
    data: tuple[PairStream, CenterCrops | None, dict[str, Any]],
    resume: bool,
    on_step: Callable[[StepReport], None] | None,
    on_message: Callable[[str], None],
    facts: dict[str, Any],
    started: float,
) -> JobResult:
    out = claim_folder(config.out, spec)
    run_dir = config.resolved_run_dir()
    stream, val_data, data_facts = data
    write_yaml(config, run_dir / CONFIG_FILE, {"architecture": spec_to_dict(spec), **facts, **data_facts})
    trainer = Trainer(task, run_dir, _options(config), stream, val_data=val_data, config=dataclasses.asdict(config), on_step=on_step)
    on_message(
        f"stage {config.stage} {config.kind}: {data_facts['train_images']} training / {data_facts['val_images']} "
        f"validation images; run folder {run_dir}"
    )
    setup = time.perf_counter() - started
    result = trainer.fit(resume=resume)
    outputs = []
    if result.status == "done" and not (resume and _written_at(config.weights_file(), result.step)):
        outputs.append(write_network(out, config.weights_file().name, task.trained, result.step))
        decoder = out / f"{config.stage}SD.pth"
        if config.kind == "SE" and decoder.is_file():  # trained on another encoder's features
            on_message(f"warning: {decoder} was trained before this encoder was written; train the decoder again for it")
    job = JobResult(config, run_dir, result, outputs, setup)
    if result.status == "interrupted":  # as a batch's Ctrl-C: a caller's loop over stages must not go on to the next
        raise TrainingInterrupted(job)
    return job
