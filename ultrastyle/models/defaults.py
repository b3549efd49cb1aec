"""A model's default transform settings: method, levels, alpha (like timm's "default config").

:func:`model_defaults` resolves them for anything ``--model`` accepts:

- a **zoo name**: the entry's ``"defaults"`` in ``zoo.json``
  (``{"method": "adain", "levels": [4], "alpha": 1.0}``), already validated
  when the registry is loaded (:attr:`ultrastyle.models.zoo.ZooEntry.defaults`);
- a **bundle folder** (has ``manifest.json``): the manifest's ``"defaults"``
  (``export_bundle`` records the source model's), else derived from the
  manifest's ``"stages"``;
- a **model folder** of CD weights ``{k}SE.pth`` / ``{k}SD.pth``: the
  top-level ``"defaults"`` key of its ``architecture.json``, beside the
  architecture keys (`spec_from_dict` ignores it, so ``folder_arch`` still
  reads the file)::

      {"name": "cd16x", "widths": [16, 32, 64, 128, 128], ...,
       "defaults": {"method": "adain", "levels": [4], "alpha": 1.0}}

  (:func:`write_folder_defaults` writes it), else derived from the stages
  whose ``{k}SE.pth`` and ``{k}SD.pth`` both exist;
- a **pytorch-AdaIN folder** (``vgg_normalised.pth`` + ``decoder.pth``):
  adain, levels (4,), alpha 1.0 (an ``architecture.json`` ``"defaults"`` key
  overrides it the same way).

Every key is optional; a missing one takes the base value: method ``wct``,
levels = the model's stages in descending order (coarse to fine), alpha 0.6
(``runtime.cascade.DEFAULT_ALPHA``); for pytorch-AdaIN weights the base is
adain, (4,), 1.0. Values are validated (method in ``wct``/``adain``, levels a
non-empty list of the model's stages, 0 <= alpha <= 1) and a bad one raises
:class:`ModelDefaultsError` naming the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ultrastyle.io.atomic import write_atomic
from ultrastyle.models.spec import STAGES
from ultrastyle.models.registry import ZooError

__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_ALPHA",
    "DEFAULTS_KEY",
    "ModelDefaults",
    "ModelDefaultsError",
    "standard_defaults",
    "defaults_from_dict",
    "model_defaults",
    "write_folder_defaults",
]

METHODS = ("wct", "adain")
DEFAULT_METHOD = "wct"
DEFAULT_ALPHA = 0.6  # = ultrastyle.runtime.cascade.DEFAULT_ALPHA (not imported: this module stays torch-free)
DEFAULTS_KEY = "defaults"
_KEYS = ("method", "levels", "alpha")


class ModelDefaultsError(ZooError, ValueError):
    """Invalid defaults; the message names the file. A ZooError, so every CLI that reports zoo errors reports it."""


@dataclass(frozen=True)
class ModelDefaults:
    """``method`` (wct | adain), ``levels`` (stages to run, coarse to fine) and ``alpha`` (0..1)."""

    method: str
    levels: tuple[int, ...]
    alpha: float

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelDefaultsError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.levels or any(k not in STAGES for k in self.levels):
            raise ModelDefaultsError(f"levels must be a non-empty tuple of stages 1..5, got {self.levels!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ModelDefaultsError(f"alpha must be in 0..1, got {self.alpha!r}")

    def to_dict(self) -> dict:
        """The JSON form (``zoo.json``, ``architecture.json``, a bundle manifest)."""
        return {"method": self.method, "levels": list(self.levels), "alpha": self.alpha}

    def restricted(self, stages: Iterable[int]) -> ModelDefaults:
        """These defaults for a model holding only ``stages``: levels outside them dropped
        (all of ``stages``, descending, if none is left)."""
        have = set(stages)
        levels = tuple(k for k in self.levels if k in have) or tuple(sorted(have, reverse=True))
        return ModelDefaults(self.method, levels, self.alpha)


def standard_defaults(stages: Iterable[int] = STAGES, *, base: str | None = None) -> ModelDefaults:
    """The base defaults of a model with ``stages``: wct, stages descending, 0.6.

    ``base="pytorch-adain"``: adain, (4,), 1.0 (the published AdaIN setting).
    """
    if base == "pytorch-adain":
        return ModelDefaults("adain", (4,), 1.0)
    return ModelDefaults(DEFAULT_METHOD, tuple(sorted(set(stages), reverse=True)), DEFAULT_ALPHA)


def defaults_from_dict(raw: object, stages: Iterable[int], *, where: str, base: str | None = None) -> ModelDefaults:
    """Validate a ``"defaults"`` mapping for a model with ``stages``; missing keys take the base values.

    ``where`` names the file (and entry) in error messages.
    """
    stages = tuple(sorted(set(stages)))
    if not isinstance(raw, Mapping):
        raise ModelDefaultsError(f"{where}: \"defaults\" must be an object like {{\"method\": \"wct\", \"levels\": [5, 4], \"alpha\": 0.6}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ModelDefaultsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in \"defaults\"; known keys: {', '.join(_KEYS)}")
    std = standard_defaults(stages, base=base)
    method = raw.get("method", std.method)
    if method not in METHODS:
        raise ModelDefaultsError(f"{where}: defaults.method must be one of {', '.join(METHODS)}, got {method!r}")
    levels = raw.get("levels", list(std.levels))
    ok = (
        isinstance(levels, (list, tuple)) and levels
        and all(isinstance(k, int) and not isinstance(k, bool) and k in stages for k in levels)
    )  # fmt: skip
    if not ok:
        raise ModelDefaultsError(
            f"{where}: defaults.levels must be a non-empty list of the model's stages "
            f"{', '.join(map(str, stages))} (coarse to fine), got {levels!r}"
        )
    alpha = raw.get("alpha", std.alpha)
    if (
        not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
        or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0
    ):  # fmt: skip
        raise ModelDefaultsError(f"{where}: defaults.alpha must be a number in 0..1, got {alpha!r}")
    return ModelDefaults(str(method), tuple(int(k) for k in levels), float(alpha))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDefaultsError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise ModelDefaultsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def model_defaults(source: str | Path) -> ModelDefaults:
    """The defaults of a zoo name, a bundle folder, a CD model folder or a pytorch-AdaIN folder.

    Nothing is downloaded or loaded: zoo entries carry theirs, folders are
    judged by their file names and JSON files. Raises :class:`ModelDefaultsError`
    (bad values, naming the file), ``CheckpointError`` (a folder without model
    weights) or ``UnknownModelError`` (neither a folder nor a zoo name).
    """
    from ultrastyle.models import zoo

    path = Path(source)
    if not path.is_dir():
        entry = zoo.get_entry(str(source))
        if entry.defaults is not None:
            return entry.defaults
        return standard_defaults(entry.stages, base="pytorch-adain" if entry.format == "pytorch-adain" else None)
    manifest = path / "manifest.json"  # ultrastyle.export.bundle.MANIFEST (that module imports torch)
    if manifest.is_file():
        data = _read_json(manifest)
        stages = data.get("stages")
        if not isinstance(stages, list) or not stages or not all(isinstance(k, int) and k in STAGES for k in stages):
            raise ModelDefaultsError(f"{manifest}: \"stages\" must be a non-empty list of stages 1..5, got {stages!r}")
        raw = data.get(DEFAULTS_KEY)
        return standard_defaults(stages) if raw is None else defaults_from_dict(raw, stages, where=str(manifest))

    from ultrastyle.models.pretrained import ARCH_FILE, folder_format, model_stages

    stages = model_stages(path)  # CheckpointError for a folder without weights
    base = "pytorch-adain" if folder_format(path) == "pytorch-adain" else None
    arch = path / ARCH_FILE
    raw = _read_json(arch).get(DEFAULTS_KEY) if arch.is_file() else None
    if raw is None:
        return standard_defaults(stages, base=base)
    return defaults_from_dict(raw, stages, where=str(arch), base=base)


def write_folder_defaults(folder: str | Path, defaults: ModelDefaults) -> Path:
    """Record ``defaults`` in ``folder/architecture.json`` (created from the folder's architecture if absent).

    The other keys of the file are kept; the file is replaced atomically.
    Returns its path.
    """
    from ultrastyle.models.pretrained import ARCH_FILE, folder_arch, folder_format, model_stages
    from ultrastyle.models.spec import ARCHS, spec_to_dict

    folder = Path(folder)
    stages = model_stages(folder)
    path = folder / ARCH_FILE
    if path.is_file():
        data = _read_json(path)
    else:
        data = spec_to_dict(ARCHS["vgg19"] if folder_format(folder) == "pytorch-adain" else folder_arch(folder))
    data[DEFAULTS_KEY] = defaults_from_dict(defaults.to_dict(), stages, where=str(path)).to_dict()
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path
