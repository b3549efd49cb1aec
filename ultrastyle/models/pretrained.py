"""Load a whole stylization model (encoder + decoder per stage) from a zoo name or a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ultrastyle.models import convert, zoo
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.spec import ARCHS, STAGES, ArchSpec, get_arch, spec_from_dict
from ultrastyle.runtime.receptive import needed_windows
from ultrastyle.runtime.transforms import apply_affine

DEFAULT_MODEL = "cd-wct-16x"
# A model folder may record its architecture here (`spec_to_dict`); without it
# the folder holds the published CD 16x architecture.
ARCH_FILE = "architecture.json"


@dataclass
class StyleModel:
    """Encoder/decoder pairs of the stages a cascade uses, on one device."""

    name: str
    arch: ArchSpec
    encoders: dict[int, Encoder] = field(default_factory=dict)
    decoders: dict[int, Decoder] = field(default_factory=dict)

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(sorted(self.encoders))

    def to(self, device: str | torch.device) -> StyleModel:
        for net in (*self.encoders.values(), *self.decoders.values()):
            net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.encoders.values())).conv0.weight.device

    @torch.inference_mode()
    def encode(self, stage: int, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> relu{stage}_1 features (N, C, H/g, W/g)."""
        return self.encoders[stage](image)

    @torch.inference_mode()
    def decode(self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """decoder(A f + b): (N, C, h, w) -> (N, 3, h*g, w*g)."""
        return self.decoders[stage](apply_affine(features, a, b))

    # The *_core variants return only a tile's core and skip the halo work the
    # core does not need (`_StageNet.forward_core`); same results as slicing.

    @torch.inference_mode()
    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """``encode(stage, image)[..., rows, cols]``."""
        return self.encoders[stage].forward_core(image, rows, cols)

    @torch.inference_mode()
    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        """``decode(stage, features, a, b)[..., rows, cols]``."""
        return self.decoders[stage].forward_core(apply_affine(features, a, b), rows, cols)

    @torch.inference_mode()
    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        """``decode(stage, encode(stage, image), a, b)[..., rows, cols]``."""
        g = self.arch.grid(stage)
        dec = self.decoders[stage].layers
        fr = needed_windows(dec, rows.start, rows.stop, image.shape[-2] // g)[0]
        fc = needed_windows(dec, cols.start, cols.stop, image.shape[-1] // g)[0]
        f = self.encode_core(stage, image, slice(*fr), slice(*fc))
        shift_r, shift_c = fr[0] * g, fc[0] * g
        return self.decode_core(
            stage, f, a, b, slice(rows.start - shift_r, rows.stop - shift_r), slice(cols.start - shift_c, cols.stop - shift_c)
        )


def cd_file_names(stages: tuple[int, ...] = STAGES) -> list[str]:
    """``{k}SE.pth`` (encoder) and ``{k}SD.pth`` (decoder) of each stage."""
    return [f"{k}{part}.pth" for k in stages for part in ("SE", "SD")]


def cd_files_present(folder: Path, stages: tuple[int, ...] = STAGES) -> bool:
    return all((folder / f).is_file() for f in cd_file_names(stages))


def folder_arch(folder: str | Path) -> ArchSpec:
    """The architecture recorded in ``folder/architecture.json``, else CD 16x."""
    path = Path(folder) / ARCH_FILE
    if not path.is_file():
        return ARCHS["cd16x"]
    try:
        return spec_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise convert.CheckpointError(f"{path}: unreadable architecture description ({exc})") from exc


def load_cd_folder(
    folder: str | Path,
    stages: tuple[int, ...] = STAGES,
    name: str | None = None,
    aux: bool = False,
    spec: ArchSpec | None = None,
) -> StyleModel:
    """A folder holding CD-format ``{k}SE.pth`` / ``{k}SD.pth`` files.

    The architecture is the one recorded in ``architecture.json`` (folders
    written by ``ultrastyle distill`` / ``train-decoder``), else CD 16x;
    ``spec`` overrides both. ``aux`` keeps the encoders' Q_k embedding layers
    (training bundles).
    """
    folder = Path(folder)
    spec = spec or folder_arch(folder)
    model = StyleModel(name or folder.name, spec)
    for k in stages:
        model.encoders[k] = convert.cd_encoder(folder / f"{k}SE.pth", k, spec=spec, aux=aux)
        model.decoders[k] = convert.cd_decoder(folder / f"{k}SD.pth", k, spec=spec)
    return model


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    stages: tuple[int, ...] = STAGES,
    device: str | torch.device = "cpu",
    progress: bool = True,
    aux: bool = False,
) -> StyleModel:
    """A zoo name (downloaded on first use, like torch.hub) or a folder of CD weights."""
    path = Path(source)
    if path.is_dir():
        if not cd_files_present(path, stages):
            missing = [f for f in cd_file_names(stages) if not (path / f).is_file()]
            raise convert.CheckpointError(
                f"{path}: expected CD weight files {{k}}SE.pth/{{k}}SD.pth for stages {list(stages)}; missing: {', '.join(missing)}"
            )
        return load_cd_folder(path, stages, aux=aux).to(device)
    entry = zoo.get_entry(str(source))  # UnknownModelError lists the known names
    folder = zoo.ensure(entry.name, progress=progress)
    return load_cd_folder(folder, stages, name=entry.name, aux=aux, spec=get_arch(entry.architecture)).to(device)
