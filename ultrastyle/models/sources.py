"""What a model source holds, read from file names and JSON files: nothing is downloaded or loaded.

A source is anything ``--model`` accepts: a zoo name, a folder of weights or
a bundle. Folders come in two formats (`folder_format`): CD-format
``{k}SE.pth`` / ``{k}SD.pth`` per stage (published CD models, and everything
``ultrastyle distill`` writes; the architecture in ``architecture.json``,
else CD 16x), and pytorch-AdaIN's ``vgg_normalised.pth`` + ``decoder.pth``
(VGG-19, stage 4 only). A model has the stages it has files for
(`model_stages`); asking for another one is a `CheckpointError` that says
which ``--levels`` would work.

:func:`model_defaults` resolves a source's default settings (`models.defaults`):

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

Loading the weights is `models.pretrained`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ultrastyle.errors import Remedy, remedied, warn
from ultrastyle.io.atomic import write_atomic
from ultrastyle.models import convert, zoo
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.models.defaults import (
    DEFAULTS_KEY, ModelDefaults, ModelDefaultsError, defaults_from_dict, standard_defaults,
)  # fmt: skip
from ultrastyle.core.arch import ARCHS, STAGES, ArchSpec, spec_from_dict, spec_to_dict

# A model folder may record its architecture here (`spec_to_dict`); without it
# the folder holds the published CD 16x architecture.
ARCH_FILE = "architecture.json"
# The published pytorch-AdaIN files (github.com/naoto0804/pytorch-AdaIN): VGG-19 to relu4_1 and its decoder.
ADAIN_FILES = ("vgg_normalised.pth", "decoder.pth")
# zoo entry formats load_model can load ("cd-base" is a training initialisation).
LOADABLE_FORMATS = ("cd", "pytorch-adain")


def cd_file_names(stages: tuple[int, ...] = STAGES) -> list[str]:
    """``{k}SE.pth`` (encoder) and ``{k}SD.pth`` (decoder) of each stage."""
    return [f"{k}{part}.pth" for k in stages for part in ("SE", "SD")]


def cd_files_present(folder: Path, stages: tuple[int, ...] = STAGES) -> bool:
    return all((folder / f).is_file() for f in cd_file_names(stages))


def folder_stages(folder: str | Path) -> tuple[int, ...]:
    """The stages whose ``{k}SE.pth`` and ``{k}SD.pth`` both exist in ``folder``, ascending."""
    return tuple(k for k in STAGES if cd_files_present(Path(folder), (k,)))


def folder_format(folder: str | Path) -> str:
    """``"pytorch-adain"`` for a folder with ``vgg_normalised.pth`` and ``decoder.pth`` and no CD stage, else ``"cd"``."""
    folder = Path(folder)
    if not folder_stages(folder) and all((folder / f).is_file() for f in ADAIN_FILES):
        return "pytorch-adain"
    return "cd"


def _csv(stages: tuple[int, ...] | list[int]) -> str:
    return ",".join(map(str, stages))


_SHADOWED: set[str] = set()


def model_folder(source: str | os.PathLike) -> Path | None:
    """``source`` as a folder of weights (or a bundle), or None where it names a zoo model (`is_zoo_name`).

    A zoo name is the zoo's model, sha256-verified, even where a folder of that name lies in the working directory:
    a folder named ``cd-wct-16x`` beside the photos once replaced the default model unverified. Such a folder is
    given as ``./cd-wct-16x`` or a `Path`; a warning says so, once per name.
    """
    if is_zoo_name(source):
        if Path(source).is_dir() and source not in _SHADOWED:
            _SHADOWED.add(str(source))
            warn(f"{source!r} is the zoo's model {source}; the folder of that name here is not used (give ./{source} for it)")
        return None
    path = Path(source)
    return path if path.is_dir() else None


def model_stages(source: str | Path) -> tuple[int, ...]:
    """The stages a zoo model or weights folder has, ascending (nothing is downloaded).

    A folder without any weights raises `CheckpointError` listing what was looked for.
    """
    path = model_folder(source)
    if path is None:
        entry = zoo.get_entry(str(source))  # UnknownModelError lists the known names
        if entry.format not in LOADABLE_FORMATS:
            fix = Remedy("list_models")
            raise remedied(convert.CheckpointError(
                f"model {entry.name} has format {entry.format!r}, which is not a stylization model "
                f"(loadable formats: {', '.join(LOADABLE_FORMATS)}); pick another model (see {fix.python()})"
            ), fix)
        return entry.stages
    if folder_format(path) == "pytorch-adain":
        return (4,)
    stages = folder_stages(path)
    if not stages:
        if (path / "manifest.json").is_file() and any(path.glob("*.onnx")):  # a bundle where weights were wanted
            try:
                made_from = _read_json(path / "manifest.json").get("model")
            except ModelDefaultsError:  # a damaged manifest: still not weights
                made_from = None
            source = f" (made from {made_from})" if isinstance(made_from, str) else ""
            raise convert.CheckpointError(
                f"{path}: an ONNX bundle{source}, not model weights; give the zoo model or weights folder it was made from"
            )
        if any(path.glob("*.onnx")):  # graphs without their manifest: a damaged bundle, not a weights folder
            raise convert.CheckpointError(
                f"{path}: holds ONNX graphs but no manifest.json, so it is not a usable bundle; "
                "export the model again into this folder (the manifest lists each graph's sha256)"
            )
        missing = [f for f in cd_file_names() if not (path / f).is_file()]
        raise convert.CheckpointError(
            f"{path}: no model weights: expected CD weight files {{k}}SE.pth/{{k}}SD.pth for some of stages "
            f"{list(STAGES)} (missing: {', '.join(missing)}), or pytorch-AdaIN's {' and '.join(ADAIN_FILES)}"
        )
    return stages


def _bundle_stages(data: dict, manifest: Path) -> tuple[int, ...]:
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(k, int) and k in STAGES for k in stages):
        raise ModelDefaultsError(f"{manifest}: \"stages\" must be a non-empty list of stages 1..5, got {stages!r}")
    return tuple(stages)


def available_stages(source: str | Path) -> tuple[int, ...]:
    """The stages a zoo model, weights folder or bundle folder has, ascending (nothing is downloaded or loaded)."""
    manifest = Path(source) / "manifest.json"
    return tuple(sorted(_bundle_stages(_read_json(manifest), manifest))) if manifest.is_file() else model_stages(source)


def check_stages(source: str | Path, stages: tuple[int, ...] | None) -> tuple[int, ...]:
    """``stages`` (None: all the model has) if ``source`` has every one of them, else `CheckpointError`.

    The message names the model's stages, what was asked and the levels that
    would work; nothing is downloaded to find out.
    """
    have = model_stages(source)
    if stages is None:
        return have
    missing = [k for k in stages if k not in have]
    if not missing:
        return tuple(stages)
    path = model_folder(source)
    what = f"model {source}"
    files = ""
    if path is not None:
        if folder_format(path) == "pytorch-adain":
            what += " (pytorch-AdaIN weights)"
        else:
            files = f" (missing: {', '.join(f for f in cd_file_names(tuple(dict.fromkeys(missing))) if not (path / f).is_file())})"
    raise convert.CheckpointError(
        f"{what} has stages {_csv(have)}; asked for {_csv(stages)}{files}; choose levels among {_csv(sorted(have, reverse=True))}"
    )


def model_files(source: str | Path, stages: tuple[int, ...]) -> list[str]:
    """The weight file names that ``stages`` of a zoo model or weights folder are loaded from."""
    path = model_folder(source)
    fmt = folder_format(path) if path is not None else zoo.get_entry(str(source)).format
    return list(ADAIN_FILES) if fmt == "pytorch-adain" else cd_file_names(tuple(dict.fromkeys(stages)))


def folder_arch(folder: str | Path) -> ArchSpec:
    """The architecture recorded in ``folder/architecture.json``, else CD 16x."""
    path = Path(folder) / ARCH_FILE
    if not path.is_file():
        return ARCHS["cd16x"]
    try:
        return spec_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise convert.CheckpointError(f"{path}: unreadable architecture description ({exc})") from exc


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
    path = model_folder(source)
    if path is None:
        entry = zoo.get_entry(str(source))
        if entry.defaults is not None:
            return entry.defaults
        return standard_defaults(entry.stages, base="pytorch-adain" if entry.format == "pytorch-adain" else None)
    manifest = path / "manifest.json"  # ultrastyle.export.bundle.MANIFEST (that module imports torch)
    if manifest.is_file():
        data = _read_json(manifest)
        stages = list(_bundle_stages(data, manifest))
        raw = data.get(DEFAULTS_KEY)
        return standard_defaults(stages) if raw is None else defaults_from_dict(raw, stages, where=str(manifest))

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
