"""Run configurations of ``ultrastyle distill`` and ``ultrastyle train-decoder``, as flat dataclasses.

A configuration is resolved in layers: the dataclass defaults, then a YAML
file (``--config``; keys as the field names, ``-`` or ``_``), then the flags
given on the command line. The resolved configuration is written beside the
checkpoints as ``config.yaml``; resuming a run reads it back, and only the
fields in `RESUMABLE` (how long and where to run, and the learning rate; not
what to train) may then differ.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ultrastyle.core.arch import STAGES
from ultrastyle.errors import Setting, remedied
from ultrastyle.io.atomic import write_atomic
from ultrastyle.models.registry import is_zoo_name

CONFIG_FILE = "config.yaml"
CHECKPOINT = "checkpoint.pt"  # in the run folder, beside its config.yaml (`trainer`)
MODES = ("wct", "adain")
# The settings only one mode's loss reads (`tasks`): WCT reconstructs the image, AdaIN matches a style.
_MODE_SETTINGS = {"wct": ("pixel_weight", "perceptual_weight"), "adain": ("style", "content_weight", "style_weight")}
KD_CHOICES = ("cd", "review", "cd+review", "mse")  # tasks.KD_METHODS describes them
PRUNE_CHOICES = ("l1", "fit")  # how a wider decoder is thinned to a student (distill.prune, distill.fit)
# What may change when a run is resumed: its length, where it runs, and its learning rate (lowered after a loss that
# diverged, as `trainer` advises; the rate is a function of the step, so the resumed steps take the new one).
RESUMABLE = frozenset({"steps", "checkpoint_every", "log_every", "val_every", "workers", "device", "threads", "lr"})
# Settings that name a choice, taken in any case as the command line takes them (`options.choice`).
NAMED_CHOICES = ("mode", "kd", "lr_schedule", "prune", "student_arch", "device")
# What a run needs given (their defaults, "" and 0, say "not given"; `RunConfig.check` and its subclasses refuse them).
REQUIRED = ("stage", "out", "images", "teacher", "encoder")
# Where a run's files are, not how it trains: a resume takes them as given (a copied or moved model folder resumes).
LOCATION = frozenset({"out", "run_dir"})
# Settings that may name a file or folder: saved absolute where they exist, so a resume from another directory matches.
PATHS = ("out", "run_dir", "images", "style", "teacher", "collaborator", "init", "encoder", "loss_encoder")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field."""


@dataclass
class RunConfig:
    """What every training run needs: stage, images, output folder, optimisation."""

    RUN: ClassVar[str] = "a training"

    stage: int = 0
    out: str = ""  # model folder receiving {k}SE.pth / {k}SD.pth and architecture.json
    images: str = ""  # folder of training photos (content)
    style: str | None = None  # folder of style images (AdaIN mode)
    mode: str = "wct"
    run_dir: str | None = None  # checkpoints, logs, config; default OUT/runs/{k}SE or {k}SD
    crop: int = 256
    resize: int = 300  # short side of each photo before cropping (0: native size), as CD
    val_fraction: float = 0.1
    batch_size: int = 4
    steps: int = 2000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or cosine (decay to lr/100 at the last step)
    warmup_steps: int = 0  # linear lr ramp over the first steps
    checkpoint_every: int = 200
    log_every: int = 10
    val_every: int = 0  # 0: at every checkpoint
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads, 0: PyTorch's default
    pixel_weight: float = 1.0
    perceptual_weight: float = 1.0
    content_weight: float = 1.0
    style_weight: float = 10.0

    def __post_init__(self) -> None:
        # Paths are accepted from Python (the saved config.yaml and resume compare them as text).
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), Path):
                setattr(self, f.name, str(getattr(self, f.name)))
            elif f.name in NAMED_CHOICES and isinstance(getattr(self, f.name), str):  # "WCT", "CD": any case, as the CLI's
                setattr(self, f.name, getattr(self, f.name).lower())

    def check(self, fresh: bool = True) -> None:
        """`ConfigError` for a setting that cannot be used. ``fresh`` False (a saved run resumed): the rules on settings a
        run would not read are left out, so that a run saved before them resumes."""
        from ultrastyle import options as check  # here: the CLI imports this module for its help, and options imports numpy

        if not self.stage:
            raise ConfigError("stage: required")
        if self.stage not in STAGES:
            raise ConfigError(f"stage: must be one of {list(STAGES)}, got {self.stage!r}")
        for name in ("out", "images"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required")
        if self.mode not in MODES:
            raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "adain" and not self.style:
            raise ConfigError("style: AdaIN mode needs a folder of style images")
        other = "adain" if self.mode == "wct" else "wct"
        if fresh and (stray := self.changed(_MODE_SETTINGS[other])):  # saved in config.yaml, unused by this mode
            fixes = (Setting("mode", other), Setting(stray[0], None))
            raise remedied(ConfigError(f"{stray[0]}: a setting of {other} mode, which this {self.mode} run would not use; "
                                       f"give {fixes[0].python()}, or leave it out ({fixes[1].python()})"), fixes)  # fmt: skip
        for f in dataclasses.fields(self):  # a string is truthy: collaborate="no" trained as True, and a resume read it as False
            if str(f.type).startswith("bool") and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{f.name}: expected True or False, got {getattr(self, f.name)!r}")
        try:  # the rules every option follows ("key: message", as a ConfigError's); a type error is one too
            for name in ("batch_size", "steps", "checkpoint_every", "log_every"):
                check.count(name, getattr(self, name), least=1)
            grid = 2 ** (self.stage - 1)
            check.count("crop", self.crop, least=2 * grid, what=f"pixels, a multiple of {grid} at stage {self.stage},")
            for name in ("resize", "val_every", "workers", "warmup_steps", "seed"):
                check.count(name, getattr(self, name))
            if check.number("val_fraction", self.val_fraction, least=0, example=0.1) >= 1:
                raise check.OptionError("val_fraction", f"expected a fraction in [0, 1), got {self.val_fraction}; give e.g. 0.1")
            check.number("lr", self.lr, above=0, example=1e-4)
            for f in dataclasses.fields(self):  # the loss weights, where a run has them
                if f.name.endswith("_weight") or f.name == "beta":
                    check.number(f.name, getattr(self, f.name), least=0)
                elif f.name == "width_factor" and check.number(f.name, self.width_factor, above=0, example=0.5) > 1:
                    raise check.OptionError(f.name, f"expected a fraction in (0, 1], got {self.width_factor:g}; give e.g. 0.5")
            check.thread_count("threads", self.threads)
            self.device = check.device("device", self.device)  # "CUDA:1" too, as torch spells it
        except check.OptionError as exc:
            raise ConfigError(str(exc)) from None
        if self.crop % grid:
            raise ConfigError(f"crop: stage {self.stage} needs a multiple of {grid} of at least {2 * grid}, got {self.crop}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule: constant or cosine, got {self.lr_schedule!r}")
        if self.warmup_steps > self.steps:  # (on resume too: steps may change there)
            raise ConfigError(f"warmup_steps: {self.warmup_steps} is more than the {self.steps} steps, so the rate would never reach lr; "
                              "give fewer warm-up steps, or more steps")  # fmt: skip
        if self.device != "cpu":
            import torch  # only here: the configuration module itself stays torch-free

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (why := check.cuda_shortfall(self.device, count)) is not None:
                raise ConfigError(f"device: {self.device}: {why}; {'give one of them' if count else 'use cpu'}")

    @property
    def kind(self) -> str:
        raise NotImplementedError

    def changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` set to other than their defaults (in this order)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [n for n in names if getattr(self, n) != defaults[n]]

    def _no_unused(self, names: tuple[str, ...], why: str, fix: str = "", remedy: tuple[Setting, ...] = ()) -> None:
        """A `ConfigError` for the first of ``names`` set though this run would not read it (it would be saved as if used).

        ``why``, ``fix``: settings named as `Setting.python` writes them, each in ``remedy`` (a front end shows them its way).
        """
        if stray := self.changed(names):
            raise remedied(ConfigError(f"{stray[0]}: {why}; {fix + ', or ' if fix else ''}leave it out"), remedy)

    @classmethod
    def from_file(cls: type[C], path: str | os.PathLike, **settings: Any) -> C:
        """The settings of a YAML file (as ``--config`` reads it; a run's own ``config.yaml`` too), ``settings`` over them:
        ``DistillConfig.from_file("distill.yaml", stage=3)``. `ConfigError` naming the file for what it cannot take."""
        return resolve(cls, os.path.expanduser(os.fspath(path)), settings)

    def has_saved_run(self) -> bool:
        """Whether the run folder holds a run to resume: its settings and a checkpoint."""
        run_dir = self.resolved_run_dir()
        return (run_dir / CONFIG_FILE).is_file() and (run_dir / CHECKPOINT).is_file()

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out) / "runs" / f"{self.stage}{self.kind}"

    def weights_file(self) -> Path:
        """Where the run's trained network goes: ``OUT/{k}SE.pth`` or ``OUT/{k}SD.pth``."""
        return Path(self.out) / f"{self.stage}{self.kind}.pth"


@dataclass
class DistillConfig(RunConfig):
    """``ultrastyle distill``: a student encoder for one stage."""

    RUN: ClassVar[str] = "a student encoder's"

    teacher: str = ""  # zoo name, model folder or VGG-19 .pth: the teacher encoder
    collaborator: str | None = None  # where the collaborator decoder {k}SD.pth is; default: the teacher
    student_arch: str | None = None  # a registered architecture; default: the teacher's widths x width_factor
    width_factor: float = 0.5
    init: str = "fit"  # fit (least squares to the teacher, see distill.fit) | prune (L1) | random | a folder or .pth with the student's weights
    beta: float = 10.0  # weight of the embedding loss Σ_b ||F_b − Q_b F'_b||²
    kd: str = "cd"  # cd | review | cd+review | mse (see tasks.KD_METHODS)
    review_weight: float = 1.0  # weight of the knowledge-review HCL loss
    review_width: int = 0  # width of the ABF fused maps; 0: the student's deepest tap width
    collaborate: bool = True  # False with kd "cd": kd "mse" (the older spelling, kept for saved configs)

    @property
    def kind(self) -> str:
        return "SE"

    @property
    def method(self) -> str:
        """The distillation method, with ``collaborate=False`` read as ``"mse"``."""
        return "mse" if self.kd == "cd" and not self.collaborate else self.kd

    @property
    def collaborates(self) -> bool:
        return self.method in ("cd", "cd+review")

    @property
    def reviews(self) -> bool:
        return self.method in ("review", "cd+review")

    def check(self, fresh: bool = True) -> None:
        super().check(fresh)
        if not self.teacher:
            raise ConfigError("teacher: required")
        if self.kd not in KD_CHOICES:
            raise ConfigError(f"kd: must be one of {', '.join(KD_CHOICES)}, got {self.kd!r}")
        if not self.collaborate and self.kd not in ("cd", "mse"):
            raise remedied(ConfigError(f"collaborate: collaborate=False contradicts kd={self.kd!r} (use kd='mse' for feature distillation only)"),
                           (Setting("collaborate", False), Setting("kd", self.kd), Setting("kd", "mse")))  # fmt: skip
        if self.review_weight < 0:
            raise ConfigError(f"review_weight: must not be negative, got {self.review_weight}")
        if self.review_width < 0:
            raise ConfigError(f"review_width: must not be negative, got {self.review_width}")
        if self.beta < 0:
            raise ConfigError(f"beta: must not be negative, got {self.beta}")
        if self.method == "mse" and self.beta == 0:
            raise ConfigError("beta: 0 without a collaborator leaves nothing to train")
        if self.method == "review" and self.review_weight == 0:
            raise ConfigError("review_weight: 0 with kd review leaves nothing to train the student")
        if fresh:
            self._unused_by_method()

    def _unused_by_method(self) -> None:
        if not self.collaborates:
            self._no_unused(("collaborator", "mode", "pixel_weight", "perceptual_weight", "content_weight", "style_weight", "style"),
                            f"a setting of the collaborator's loss, and kd={self.method!r} has no collaborator", "give kd='cd' or kd='cd+review'",
                            (Setting("kd", self.method), Setting("kd", "cd"), Setting("kd", "cd+review")))  # fmt: skip
        if not self.reviews:
            self._no_unused(("review_weight", "review_width"), f"a setting of knowledge review, which kd={self.method!r} leaves out",
                            "give kd='review' or kd='cd+review'", (Setting("kd", self.method), Setting("kd", "review"), Setting("kd", "cd+review")))  # fmt: skip
        if self.student_arch:
            self._no_unused(("width_factor",), f"the student's widths are those of {self.student_arch} (student_arch)", remedy=(Setting("student_arch"),))
        if self.collaborates and self.mode == "wct" and self.beta == self.pixel_weight == self.perceptual_weight == 0:
            raise ConfigError("beta: 0, with pixel_weight and perceptual_weight 0 too, leaves nothing to train the student")


@dataclass
class DecoderConfig(RunConfig):
    """``ultrastyle train-decoder``: a decoder for one stage of a given encoder."""

    RUN: ClassVar[str] = "a decoder's"

    encoder: str = ""  # zoo name, model folder or VGG-19 .pth whose features are decoded
    loss_encoder: str | None = None  # network of the perceptual loss; default: the encoder itself
    init: str = "random"  # random | a model with {k}SD.pth (copied, or pruned if it is wider)
    prune: str = "fit"  # how a wider init decoder is thinned: fit (least squares, see distill.fit) | l1 (filter norms, recalibrated)

    @property
    def kind(self) -> str:
        return "SD"

    def check(self, fresh: bool = True) -> None:
        super().check(fresh)
        if not self.encoder:
            raise ConfigError("encoder: required")
        if self.prune not in PRUNE_CHOICES:
            raise ConfigError(f"prune: must be one of {', '.join(PRUNE_CHOICES)}, got {self.prune!r}")
        if self.init in PRUNE_CHOICES + ("prune",) and not Path(self.init).exists():
            raise ConfigError(f"init: {self.init!r} is a way to thin a wider start (prune); init is random, or a model with a decoder to start from")
        if fresh and self.init == "random":
            self._no_unused(("prune",), "how a wider start decoder is thinned, and the start is random (init)",
                            "give a model with a decoder to start from (init)", (Setting("init"),))  # fmt: skip
        if fresh and self.mode == "adain":  # the AdaIN loss is measured through the encoder itself (tasks.DecoderTask)
            self._no_unused(("loss_encoder",), "the network of the reconstruction's perceptual loss, and mode='adain' measures its "
                                               "loss through the encoder", "give mode='wct'", (Setting("mode", "adain"), Setting("mode", "wct")))  # fmt: skip
        weights = ("pixel_weight", "perceptual_weight") if self.mode == "wct" else ("content_weight", "style_weight")
        if all(getattr(self, w) == 0 for w in weights):
            raise ConfigError(f"{weights[0]}: 0, with {weights[1]} 0 too, leaves nothing to train the decoder")


C = TypeVar("C", bound=RunConfig)


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    kind = str(field.type)
    if value is None:
        if "None" in kind:
            return None
        if field.name not in REQUIRED and field.default is not dataclasses.MISSING:  # YAML's "device:" with nothing after it
            raise ConfigError(f"{field.name}: got nothing (null); leave it out for its default, {field.default}")
        raise ConfigError(f"{field.name}: required, got nothing")
    if isinstance(value, os.PathLike):  # a path from Python, kept as text (as `RunConfig.__post_init__` keeps it)
        value = os.fspath(value)
    if not isinstance(value, (str, int, float)):  # bool is an int; a YAML list or mapping is no setting's value
        # named by its type: the text of a few hundred bytes of YAML aliases ("billion laughs") runs to gigabytes
        raise ConfigError(f"{field.name}: expected {kind}, got a {'list' if isinstance(value, (list, tuple)) else type(value).__name__}")
    try:
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        shown = repr(value)
        raise ConfigError(f"{field.name}: expected {kind}, got {shown if len(shown) <= 80 else shown[:77] + '...'}") from None


def from_mapping(cls: type[C], values: Mapping[str, Any], base: C | None = None, source: str = "") -> C:
    """``base`` (or the defaults) updated with ``values``; unknown keys are an error naming the known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dataclasses.asdict(base) if base is not None else {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            where = f"{source}: " if source else ""
            theirs = [c for c in RunConfig.__subclasses__() if c is not cls and name in {f.name for f in dataclasses.fields(c)}]
            if theirs:  # e.g. a distill run's folder resumed as a decoder's
                raise ConfigError(f"{where}{key!r} is a setting of {theirs[0].RUN} run, not of {cls.RUN} run; "
                                  f"give the settings (or the run folder) of {cls.RUN} run")  # fmt: skip
            raise ConfigError(f"{where}unknown setting {key!r}; known: {', '.join(sorted(fields))}")
        out[name] = _coerce(fields[name], value)
    return cls(**out)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:  # an image or a file in another encoding given as the config
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start} is 0x{exc.object[exc.start]:02x}); give a YAML file of "
                          "settings") from None  # fmt: skip
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def resolve(cls: type[C], config_file: str | Path | None, flags: Mapping[str, Any]) -> C:
    """Defaults <- YAML file <- flags (``None`` values in ``flags`` mean "not given")."""
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = cls()
    if config_file:  # a key the flags give is not read from the file (e.g. `stage: 1,2`, split into one run per stage)
        # A run's own config.yaml may be given too: its `resolved` facts are a record, not settings.
        from_file = {k: v for k, v in read_yaml(config_file).items() if str(k).replace("-", "_") not in given and k != "resolved"}
        cfg = from_mapping(cls, from_file, cfg, source=str(config_file))
    return from_mapping(cls, given, cfg)


def _same(now: Any, then: Any) -> bool:
    """Equal settings; paths written two ways (``r3``, ``/abs/r3``) to one existing file or folder are the same."""
    if now == then:
        return True
    if isinstance(now, str) and isinstance(then, str) and Path(now).exists():
        return Path(now).resolve() == Path(then).resolve()
    return False


def for_resume(saved: C, given: C, explicit: Mapping[str, Any]) -> C:
    """The saved config of a run, with the `RESUMABLE` fields taken from ``given``.

    ``explicit`` are the settings the user gave this time (file or flags): any
    other setting among them that differs from the saved run is an error.
    """
    now = dataclasses.asdict(given)
    then = dataclasses.asdict(saved)
    moved = _moved_with_out(then, now)  # e.g. train-decoder's encoder in its own output folder, copied with it
    then.update(moved)
    names = {str(k).replace("-", "_") for k in explicit}
    clash = sorted(k for k in names - RESUMABLE - LOCATION if k in now and not _same(now[k], then[k]))
    if clash:
        diffs = ", ".join(f"{k}={then[k]!r} (now {now[k]!r})" for k in clash)
        raise ConfigError(
            f"cannot resume with different settings: the run was started with {diffs}; "
            "start a new run in another folder to change them"
        )
    return dataclasses.replace(saved, **moved, **{k: now[k] for k in (RESUMABLE & names) | LOCATION})


def _moved_with_out(then: dict[str, Any], now: dict[str, Any]) -> dict[str, str]:
    """Saved path settings inside the saved output folder, moved into the output folder given now where they are there too."""
    old, new = then.get("out"), now.get("out")
    if not old or not new or _same(new, old):
        return {}
    old_dir = Path(old).resolve()
    out = {}
    for name in PATHS:
        value = then.get(name)
        if name in LOCATION or not isinstance(value, str) or not value:
            continue
        path = Path(value).resolve()
        if path == old_dir or old_dir in path.parents:
            moved = Path(new).resolve() / path.relative_to(old_dir)
            if moved.exists():  # copied along; a path left behind stays where it is
                out[name] = str(moved)
    return out


def write_yaml(config: RunConfig, path: Path, extra: Mapping[str, Any] | None = None) -> None:
    """The resolved configuration (plus ``extra`` facts, e.g. the student architecture) as YAML, atomically."""
    import yaml

    data = dataclasses.asdict(config)
    for name in PATHS:
        value = data.get(name)
        # not init's methods, nor a zoo name (the zoo's model, whatever folder of that name is here)
        if isinstance(value, str) and value not in ("", "fit", "prune", "random") and not is_zoo_name(value) and Path(value).exists():
            data[name] = str(Path(value).resolve())
    if extra:
        data["resolved"] = dict(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def read_saved(cls: type[C], path: Path) -> C:
    """A run's saved ``config.yaml`` (its ``resolved`` facts are dropped)."""
    data = read_yaml(path)
    data.pop("resolved", None)
    return from_mapping(cls, data, source=str(path))
