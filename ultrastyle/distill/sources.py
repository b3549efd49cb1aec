"""Where training networks come from: a zoo name, a model folder, or a single weight file.

- a model folder (CD format ``{k}SE.pth`` / ``{k}SD.pth``, architecture from
  its ``architecture.json``, else CD 16x), e.g. ``models/cd-wct-16x``
  or the output folder of ``ultrastyle distill``;
- a zoo name (``cd-wct-16x``), installed on first use;
- a single ``.pth`` file: torchvision's ImageNet VGG-19 or pytorch-AdaIN's
  ``vgg_normalised.pth`` as an encoder (told apart by their first layer), or
  pytorch-AdaIN's ``decoder.pth`` as the stage-4 decoder.
"""

from __future__ import annotations

from pathlib import Path

from ultrastyle.core.arch import ArchSpec, get_arch
from ultrastyle.models import convert, zoo
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.models.sources import folder_arch
from ultrastyle.models.sources import model_folder as given_folder


def _folder(source: str | Path) -> tuple[Path, ArchSpec]:
    found = given_folder(source)  # a zoo name is the zoo's model, whatever folder of that name is here
    if found is not None:
        return found, folder_arch(found)
    path = Path(source)
    if not is_zoo_name(source) and (path.suffix or "/" in str(source) or path.exists()):
        raise convert.CheckpointError(f"{source}: no such model folder or weight file")
    entry = zoo.get_entry(str(source))  # UnknownModelError lists the known names
    return zoo.ensure(entry.name), get_arch(entry.architecture)


def model_folder(source: str | Path) -> Path:
    """The folder of a model folder or zoo model (installed on first use)."""
    return _folder(source)[0]


def source_arch(source: str | Path) -> ArchSpec:
    """The architecture of a model folder or zoo model (a VGG-19 file: ``vgg19``)."""
    if Path(source).is_file():
        return get_arch("vgg19")
    return _folder(source)[1]


def load_encoder(source: str | Path, stage: int, *, aux: bool | None = False) -> Encoder:
    """The stage-``stage`` encoder of ``source`` (see module doc), in eval mode on the CPU.

    ``aux``: keep the Q_k layers (True), drop them (False), or keep them when
    the file has them (None).
    """
    path = Path(source)
    if path.is_file():
        sd = convert.read_state_dict(path)
        if any(k.startswith("conv") for k in sd):  # CD's format: its architecture is the folder's (architecture.json)
            raise convert.CheckpointError(f"{path}: a stage file of a model folder, not a whole VGG-19; give its folder, {path.parent}")
        first = next((v for k, v in sd.items() if k.endswith("weight")), None)
        if first is not None and tuple(first.shape) == (3, 3, 1, 1):  # AdaIN's conv0: normalisation built in
            return convert.adain_vgg_encoder(path, stage)
        return convert.torchvision_vgg19_encoder(path, stage)
    folder, spec = _folder(source)
    path = folder / f"{stage}SE.pth"
    if aux is None:
        aux = spec.teacher_widths is not None and any("_aux." in k for k in convert.read_state_dict(path))
    return convert.cd_encoder(path, stage, spec=spec, aux=aux)


def load_decoder(source: str | Path, stage: int) -> Decoder:
    """The stage-``stage`` decoder of ``source`` (see module doc), in eval mode on the CPU."""
    path = Path(source)
    if path.is_file():
        if stage != 4:
            raise convert.CheckpointError(f"{path}: a single decoder file is pytorch-AdaIN's relu4_1 decoder; stage {stage} needs a model folder")
        return convert.adain_decoder(path)
    folder, spec = _folder(source)
    return convert.cd_decoder(folder / f"{stage}SD.pth", stage, spec=spec)
