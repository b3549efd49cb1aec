"""Checkpoint converters: published weight files -> `Encoder` / `Decoder`.

Every file is read with ``torch.load(weights_only=True, map_location="cpu")``
(some published CD files hold CUDA tensors). A file whose layers do not match
the architecture raises `CheckpointError` listing expected vs found shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ultrastyle.core.arch import ARCHS, ArchSpec
from ultrastyle.models.networks import Decoder, Encoder

StateDict = Mapping[str, torch.Tensor]

# torchvision's ImageNet normalisation, folded into conv0 of a VGG-19 teacher.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision vgg19().features indices of each conv.
TORCHVISION_VGG19 = {
    "conv11": 0, "conv12": 2, "conv21": 5, "conv22": 7, "conv31": 10, "conv32": 12, "conv33": 14,
    "conv34": 16, "conv41": 19, "conv42": 21, "conv43": 23, "conv44": 25, "conv51": 28,
}  # fmt: skip
# pytorch-AdaIN's vgg_normalised.pth (nn.Sequential) indices.
ADAIN_VGG = {
    "conv0": 0, "conv11": 2, "conv12": 5, "conv21": 9, "conv22": 12, "conv31": 16, "conv32": 19,
    "conv33": 22, "conv34": 25, "conv41": 29, "conv42": 32, "conv43": 35, "conv44": 38, "conv51": 42,
}  # fmt: skip
# pytorch-AdaIN's decoder.pth (nn.Sequential, relu4_1 -> image) indices.
ADAIN_DECODER = {
    "conv41": 1, "conv34": 5, "conv33": 8, "conv32": 11, "conv31": 14, "conv22": 18, "conv21": 21,
    "conv12": 25, "conv11": 28,
}  # fmt: skip


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the architecture."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` file, unwrapping CD's ``{"model": ..., "epoch": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weight file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        # torch's own text suggests weights_only=False, i.e. running the file's pickle: never for a file that fails here
        text = str(exc)
        if "WeightsUnpickler error:" in text:  # the unpickler's own reason, without the advice around it
            reason = " ".join(text.split("WeightsUnpickler error:")[1].split("Check the documentation")[0].split()) or "refused"
        else:
            reason = " ".join(text.split()) or "unreadable"
        raise CheckpointError(
            f"{path}: not a readable PyTorch weight file ({type(exc).__name__}: {reason}); "
            "it is damaged or not a tensor-only checkpoint (weights are read with weights_only=True: no pickled code runs)"
        ) from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return {k: v.detach().to("cpu", torch.float32) for k, v in obj.items()}


def load_weights(module: torch.nn.Module, sd: StateDict, source: str | Path) -> None:
    """Copy ``sd`` into ``module`` after checking every name and shape."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != found:
        lines = []
        for k in sorted(set(expected) | set(found)):
            e, f = expected.get(k), found.get(k)
            if e != f:
                lines.append(f"  {k}: expected {e or 'nothing'}, found {f or 'nothing'}")
        kind = type(module).__name__
        arch = getattr(module, "spec", None)
        what = f"{kind} stage {getattr(module, 'stage', '?')} of {arch.name}" if arch else kind
        raise CheckpointError(
            f"{source}: layers do not match {what}:\n" + "\n".join(lines) + "\nIs this the right file for that stage and model?"
        )
    module.load_state_dict({k: sd[k] for k in expected})


def cd_encoder(path: str | Path, stage: int, *, spec: ArchSpec = ARCHS["cd16x"], aux: bool = False) -> Encoder:
    """A CD encoder ``{k}SE.pth`` or pruned base ``e{k}_base.pth``; ``aux`` keeps the Q_k layers."""
    enc = Encoder(spec, stage, aux=aux)
    sd = read_state_dict(path)
    if not aux:  # the Q_k embeddings serve training only
        sd = {k: v for k, v in sd.items() if "_aux." not in k}
    load_weights(enc, sd, path)
    return enc.eval()


def cd_decoder(path: str | Path, stage: int, *, spec: ArchSpec = ARCHS["cd16x"]) -> Decoder:
    """A CD decoder ``{k}SD.pth`` or pruned base ``d{k}_base.pth``."""
    dec = Decoder(spec, stage)
    load_weights(dec, read_state_dict(path), path)
    return dec.eval()


def _renamed(sd: StateDict, index: Mapping[str, int], prefix: str, wanted: list[str], source: str | Path) -> dict:
    out = {}
    for name in wanted:
        for p in ("weight", "bias"):
            key = f"{prefix}{index[name]}.{p}"
            if key not in sd:
                raise CheckpointError(
                    f"{source}: expected tensor {key!r} for {name}, found keys {sorted(sd)[:6]}..."
                    " Is this the right kind of file?"
                )
            out[f"{name}.{p}"] = sd[key]
    return out


def torchvision_vgg19_encoder(path: str | Path, stage: int) -> Encoder:
    """torchvision's ImageNet VGG-19 (``features.N.*``) as a stage encoder on [0, 1] RGB.

    The ImageNet mean/std normalisation is folded into ``conv0``; torchvision's
    zero padding becomes reflect padding, as in every WCT/AdaIN encoder.
    """
    enc = Encoder(ARCHS["vgg19"], stage)
    sd = read_state_dict(path)
    prefix = "features." if any(k.startswith("features.") for k in sd) else ""
    convs = ARCHS["vgg19"].conv_names(stage)
    new = _renamed(sd, TORCHVISION_VGG19, prefix, convs, path)
    std = torch.tensor(IMAGENET_STD)
    new["conv0.weight"] = torch.diag(1.0 / std).reshape(3, 3, 1, 1)
    new["conv0.bias"] = -torch.tensor(IMAGENET_MEAN) / std
    load_weights(enc, new, path)
    return enc.eval()


def adain_vgg_encoder(path: str | Path, stage: int = 4) -> Encoder:
    """pytorch-AdaIN's ``vgg_normalised.pth`` (its conv0 already normalises)."""
    enc = Encoder(ARCHS["vgg19"], stage)
    convs = ["conv0", *ARCHS["vgg19"].conv_names(stage)]
    load_weights(enc, _renamed(read_state_dict(path), ADAIN_VGG, "", convs, path), path)
    return enc.eval()


def adain_decoder(path: str | Path) -> Decoder:
    """pytorch-AdaIN's ``decoder.pth``: relu4_1 (512 ch) -> image, no final ReLU."""
    dec = Decoder(ARCHS["vgg19"], 4)
    load_weights(dec, _renamed(read_state_dict(path), ADAIN_DECODER, "", list(ADAIN_DECODER), path), path)
    return dec.eval()
