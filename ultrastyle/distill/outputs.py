"""Trained networks as a model folder in CD's format, loadable like any published model.

A model folder holds ``{k}SE.pth`` (encoder of stage k, with its Q_k layers
when it is a distillation student) and ``{k}SD.pth`` (decoder), each
``{"model": state_dict, "step": int}`` with CPU float tensors (readable with
``torch.load(weights_only=True)`` and by CD's own code), plus
``architecture.json`` (`spec_to_dict`). ``ultrastyle stylize --model DIR`` and
``ultrastyle export DIR`` read such a folder once it has both files of the
stages they use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ultrastyle.core.arch import ArchSpec, spec_to_dict
from ultrastyle.distill.trainer import atomic_save
from ultrastyle.io.atomic import sweep_stale, write_atomic
from ultrastyle.models.defaults import DEFAULTS_KEY, ModelDefaults
from ultrastyle.models.sources import ARCH_FILE, folder_arch, write_folder_defaults


class OutputError(ValueError):
    """A model folder that cannot take these weights (another architecture)."""


def claim_folder(folder: str | Path, spec: ArchSpec) -> Path:
    """Make ``folder`` a model folder of ``spec``: write ``architecture.json``, or check the one there.

    A folder that holds CD weight files but no ``architecture.json`` is a CD
    16x folder (`folder_arch`); mixing architectures in one folder is refused.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only parent: name the model folder, not an errno
        raise OutputError(f"{folder}: cannot be the model folder ({exc.strerror}: {exc.filename})") from None
    sweep_stale(folder)  # weights of a run killed mid-write
    has_weights = any(folder.glob("[1-5]S[ED].pth"))
    if (folder / ARCH_FILE).is_file() or has_weights:
        found = folder_arch(folder)
        if _dims(found) != _dims(spec):
            raise OutputError(
                f"{folder} holds {found.name} weights (widths {list(found.widths)}), this run trains "
                f"{spec.name} (widths {list(spec.widths)}); write to another folder"
            )
        if (folder / ARCH_FILE).is_file():
            return folder
    write_atomic(folder / ARCH_FILE, json.dumps(spec_to_dict(spec), indent=1) + "\n")
    return folder


def _dims(spec: ArchSpec) -> tuple:
    d = spec_to_dict(spec)
    d.pop("name")
    return tuple(sorted((k, json.dumps(v)) for k, v in d.items()))


def write_network(folder: str | Path, filename: str, net: nn.Module, step: int = 0) -> Path:
    """``{"model": state_dict, "step": step}`` of ``net`` (CPU float32) as ``folder/filename``, atomically."""
    path = Path(folder) / filename
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in net.state_dict().items()}
    atomic_save({"model": sd, "step": int(step)}, path)
    return path


def record_adain_stage(folder: str | Path, stage: int) -> Path:
    """Make ``folder``'s defaults AdaIN (alpha 1) at ``stage``, beside the stages already recorded as AdaIN.

    A decoder trained in AdaIN mode decodes AdaIN's statistics, not WCT's, so the
    folder must stylize with adain by default, as a published AdaIN model does.
    """
    path = Path(folder) / ARCH_FILE
    saved = json.loads(path.read_text(encoding="utf-8")).get(DEFAULTS_KEY) if path.is_file() else None
    levels = {stage} | (set(saved.get("levels", [])) if saved and saved.get("method") == "adain" else set())
    return write_folder_defaults(folder, ModelDefaults("adain", tuple(sorted(levels, reverse=True)), 1.0))
