"""The export spec as data: graph names, inputs, outputs, dynamic axes, opset, tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field

BUNDLE_FORMAT = "ultrastyle-bundle"
BUNDLE_FORMAT_VERSION = 1
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 22)  # Resize with scales and Pad with a pads input exist from 13


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str | int, ...]  # str: a dynamic axis
    dtype: str = "float32"


@dataclass(frozen=True)
class NetworkSpec:
    """One graph of a bundle."""

    kind: str  # "encoder" | "decoder" | "decoder_affine" | "decoder_folded" | "encoder_aux" (training bundles)
    stage: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}{self.stage}"

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


# Max abs difference allowed between ONNX Runtime and PyTorch, per dtype and
# network output (images in [0, 1]; features of CD 16x reach ~1e2).
ATOL = {"float32": {"encoder": 2e-4, "encoder_aux": 5e-4, "decoder": 1e-4, "decoder_affine": 1e-4, "decoder_folded": 1e-4}}
RTOL = {"float32": 1e-4}


@dataclass(frozen=True)
class ExportSpec:
    opset: int = DEFAULT_OPSET
    stages: tuple[int, ...] = (1, 2, 3, 4, 5)
    # decoder_folded: the same map as decoder_affine, folded into the first conv (what the CPU runs)
    kinds: tuple[str, ...] = ("encoder", "decoder", "decoder_affine", "decoder_folded")
    # validation sizes per stage, in grid cells (H, W): odd and even counts, non-square
    check_cells: tuple[tuple[int, int], ...] = field(default=((2, 2), (3, 5), (7, 4)))

    def networks(self, channels: dict[int, int], embeds: dict[int, tuple[int, ...]] | None = None) -> list[NetworkSpec]:
        """Graph specs for every stage and kind; ``channels[k]`` is relu{k}_1's width.

        ``embeds[k]`` (the output widths of stage k's Q_1..Q_k, `ArchSpec.aux_layers`) is needed for ``encoder_aux``.
        """
        out = []
        for k in self.stages:
            c = channels[k]
            image = TensorSpec("image", ("N", 3, "H", "W"))
            feats = TensorSpec("features", ("N", c, "h", "w"))
            if "encoder" in self.kinds:
                out.append(NetworkSpec("encoder", k, (image,), (feats,)))
            if "decoder" in self.kinds:
                out.append(NetworkSpec("decoder", k, (feats,), (image,)))
            if "encoder_aux" in self.kinds:
                if embeds is None or k not in embeds:
                    raise ValueError("encoder_aux graphs need the widths of the Q_k embeddings (a student architecture)")
                outs = tuple(TensorSpec(f"embed{b}", ("N", w, f"h{b}", f"w{b}")) for b, w in enumerate(embeds[k], start=1))
                out.append(NetworkSpec("encoder_aux", k, (image,), (feats, *outs)))
            for kind in ("decoder_affine", "decoder_folded"):
                if kind in self.kinds:
                    a, b = TensorSpec("A", (c, c)), TensorSpec("b", (c,))
                    out.append(NetworkSpec(kind, k, (feats, a, b), (image,)))
        return out
