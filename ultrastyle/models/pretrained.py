"""Load a whole stylization model (encoder + decoder per stage) from a zoo name or a folder.

What a source holds (its format, stages, architecture and defaults) is read
without loading anything by `models.sources`; this module loads the weights
into a `StyleModel`. Asking for a stage the model lacks is a
`CheckpointError` that says which levels would work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ultrastyle.core.arch import ARCHS, STAGES, ArchSpec, get_arch
from ultrastyle.core.receptive import needed_windows
from ultrastyle.core.transforms import apply_affine
from ultrastyle.models import convert, zoo
from ultrastyle.models.defaults import DEFAULT_MODEL, ModelDefaults
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.sources import ADAIN_FILES, check_stages, folder_arch, folder_format, model_defaults, model_folder


@dataclass
class StyleModel:
    """Encoder/decoder pairs of the stages a cascade uses, on one device."""

    name: str
    arch: ArchSpec
    encoders: dict[int, Encoder] = field(default_factory=dict)
    decoders: dict[int, Decoder] = field(default_factory=dict)
    # The source's defaults restricted to the loaded stages (`load_model` sets them; export records them).
    defaults: ModelDefaults | None = None

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


def load_adain_folder(folder: str | Path, stages: tuple[int, ...] = (4,), name: str | None = None, aux: bool = False) -> StyleModel:
    """A folder holding pytorch-AdaIN's ``vgg_normalised.pth`` and ``decoder.pth``: VGG-19, stage 4."""
    folder = Path(folder)
    if aux:
        raise convert.CheckpointError(f"{folder}: pytorch-AdaIN weights have no Q_k embedding layers (aux); load them without aux")
    check_stages(folder, stages)
    model = StyleModel(name or folder.name, ARCHS["vgg19"])
    model.encoders[4] = convert.adain_vgg_encoder(folder / ADAIN_FILES[0], 4)
    model.decoders[4] = convert.adain_decoder(folder / ADAIN_FILES[1])
    return model


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    stages: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    aux: bool = False,
) -> StyleModel:
    """A zoo name (installed on first use, like torch.hub), a folder of CD weights or a pytorch-AdaIN folder.

    ``stages`` None loads every stage the model has. A stage the model lacks
    raises `CheckpointError` before anything is downloaded (`check_stages`).
    The model's `defaults` (`model_defaults`, restricted to the loaded stages)
    ride along as ``StyleModel.defaults``.
    """
    path = model_folder(source)
    if path is not None:
        stages = check_stages(path, stages)
        defaults = model_defaults(path)
        if folder_format(path) == "pytorch-adain":
            model = load_adain_folder(path, stages, aux=aux)
        else:
            model = load_cd_folder(path, stages, aux=aux)
    else:
        entry = zoo.get_entry(str(source))  # UnknownModelError lists the known names
        stages = check_stages(entry.name, stages)  # also refuses formats that are not stylization models
        defaults = model_defaults(entry.name)
        folder = zoo.ensure(entry.name, progress=progress)
        if entry.format == "pytorch-adain":
            model = load_adain_folder(folder, stages, name=entry.name, aux=aux)
        else:
            model = load_cd_folder(folder, stages, name=entry.name, aux=aux, spec=get_arch(entry.architecture))
    model.defaults = defaults.restricted(stages)
    return model.to(device)
