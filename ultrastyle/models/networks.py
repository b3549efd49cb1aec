"""`Encoder` and `Decoder`: one class each, built from an `ArchSpec` and a stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ultrastyle.core.receptive import needed_windows
from ultrastyle.core.arch import ArchSpec, Layer


# CUDA's reflection-pad kernel indexes in 32 bits: it refuses outputs of 2**31 elements or more
# ("input tensor must fit into 32-bit index math"), e.g. stage 1's 24-channel features of a 90 MP image.
CUDA_PAD_MAX_ELEMENTS = 2**31 - 1


def reflect_pad(x: torch.Tensor, p: int, max_elements: int = CUDA_PAD_MAX_ELEMENTS) -> torch.Tensor:
    """``F.pad(x, (p, p, p, p), mode="reflect")``; on CUDA past ``max_elements`` by concatenating mirrored edges."""
    n, c, h, w = x.shape
    if x.device.type != "cuda" or n * c * (h + 2 * p) * (w + 2 * p) <= max_elements:
        return F.pad(x, (p, p, p, p), mode="reflect")
    if p >= min(h, w):
        raise ValueError(f"reflection padding of {p} needs more than {p} rows and columns, got {h}x{w}")
    x = torch.cat([x[:, :, 1 : p + 1].flip(2), x, x[:, :, h - 1 - p : h - 1].flip(2)], 2)
    return torch.cat([x[..., 1 : p + 1].flip(3), x, x[..., w - 1 - p : w - 1].flip(3)], 3)


class _StageNet(nn.Module):
    """Runs a list of `Layer`s; convs are registered under their published names."""

    def __init__(self, layers: list[Layer]) -> None:
        super().__init__()
        self.layers = layers
        for layer in layers:
            if layer.kind == "conv":
                self.add_module(layer.name, nn.Conv2d(layer.cin, layer.cout, layer.kernel))

    def forward_core(self, x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """``self(x)[..., rows, cols]``, computing only what that core needs.

        ``x`` is a tile region whose origin lies on the network's pooling grid;
        after each layer the tensor is cropped to the window the remaining
        layers need for the core (kept on the remaining pooling grid), so halo
        pixels are dropped as soon as they stop mattering. The reflection pad at
        a crop edge is wrong, but only inside what the next crop drops.
        """
        h_in, w_in = x.shape[-2:]
        row_windows = needed_windows(self.layers, rows.start, rows.stop, h_in)
        col_windows = needed_windows(self.layers, cols.start, cols.stop, w_in)
        r0, c0 = row_windows[0][0], col_windows[0][0]
        x = x[..., r0 : row_windows[0][1], c0 : col_windows[0][1]]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, x)
            r0 = r0 // 2 if layer.kind == "pool" else r0 * 2 if layer.kind == "up" else r0
            c0 = c0 // 2 if layer.kind == "pool" else c0 * 2 if layer.kind == "up" else c0
            (rs, re), (cs, ce) = row_windows[i + 1], col_windows[i + 1]
            x = x[..., rs - r0 : re - r0, cs - c0 : ce - c0]
            r0, c0 = rs, cs
        return x

    def _layer(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.kind == "pool":
            return F.max_pool2d(x, 2, 2)
        if layer.kind == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if layer.kernel > 1:
            x = reflect_pad(x, layer.kernel // 2)
        x = getattr(self, layer.name)(x)
        return F.relu_(x) if layer.relu else x  # in place: the conv output is fresh


class Encoder(_StageNet):
    """Encoder of ``stage``: image (N, 3, H, W) in [0, 1] -> relu{stage}_1 (N, C, H/2^(k-1), W/2^(k-1)).

    H and W must be multiples of ``spec.grid(stage)`` (see `core.padding`).
    With ``aux=True`` the Q_k embeddings (``conv{b}1_aux``) are built too; they
    are used by distillation only and never in `forward`.
    """

    def __init__(self, spec: ArchSpec, stage: int, aux: bool = False) -> None:
        super().__init__(spec.encoder_layers(stage))
        self.spec, self.stage = spec, stage
        self.out_channels = spec.feature_channels(stage)
        if aux:
            for layer in spec.aux_layers(stage):
                self.add_module(layer.name, nn.Conv2d(layer.cin, layer.cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self._layer(layer, x)
        return x

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """All ``relu{b}_1`` features up to this stage, e.g. for perceptual losses."""
        out: dict[str, torch.Tensor] = {}
        for layer in self.layers:
            x = self._layer(layer, x)
            if layer.kind == "conv" and layer.name.endswith("1") and layer.name != "conv0":
                out[f"relu{layer.name[4]}_1"] = x
        return out


class Decoder(_StageNet):
    """Decoder of ``stage``: relu{stage}_1 features (N, C, h, w) -> image (N, 3, h*2^(k-1), w*2^(k-1))."""

    def __init__(self, spec: ArchSpec, stage: int) -> None:
        super().__init__(spec.decoder_layers(stage))
        self.spec, self.stage = spec, stage
        self.in_channels = spec.feature_channels(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self._layer(layer, x)
        return x
