"""Architectures as data: one width table describes every VGG-shaped encoder.

Block ``b`` (1..5) holds ``CONVS_PER_BLOCK[b]`` 3x3 convolutions named
``conv{b}{j}``; blocks 2..5 start with a 2x2 max-pool. Encoder ``k`` stops after
``conv{k}1`` + ReLU (the ``relu{k}_1`` tap). Decoder ``k`` mirrors it.
See docs/design.md, "The models".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CONVS_PER_BLOCK = {1: 2, 2: 2, 3: 4, 4: 4, 5: 1}
STAGES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Layer:
    """One step of a stage network.

    kind: ``conv`` (reflect-pad ``kernel // 2`` then conv), ``pool`` (2x2 max,
    stride 2) or ``up`` (nearest 2x). ``relu`` applies after a conv.
    """

    kind: Literal["conv", "pool", "up"]
    name: str = ""
    cin: int = 0
    cout: int = 0
    kernel: int = 3
    relu: bool = True


@dataclass(frozen=True)
class ArchSpec:
    """A family member: widths of blocks 1..5 plus per-stage width overrides.

    ``overrides`` maps ``(stage, conv_name) -> width`` for the few layers that a
    published model made wider in one stage only (CD 16x: conv11 is 24 wide in
    the stage-1 encoder).
    """

    name: str
    widths: tuple[int, int, int, int, int]
    overrides: dict[tuple[int, str], int] = field(default_factory=dict)
    decoder_final_relu: bool = False
    teacher_widths: tuple[int, int, int, int, int] | None = None  # aux (Q_k) targets, training only
    # Per-stage overrides of the teacher's widths, e.g. a CD 16x teacher's 24-wide
    # relu1_1 in stage 1: ``(stage, conv_name) -> width``, like ``overrides``.
    teacher_overrides: dict[tuple[int, str], int] = field(default_factory=dict)

    def conv_names(self, stage: int) -> list[str]:
        """Encoder conv names of ``stage`` in order, without ``conv0``."""
        _check_stage(stage)
        names = []
        for b in range(1, stage + 1):
            n = 1 if b == stage else CONVS_PER_BLOCK[b]
            names += [f"conv{b}{j}" for j in range(1, n + 1)]
        return names

    def width(self, stage: int, conv: str) -> int:
        return self.overrides.get((stage, conv), self.widths[int(conv[4]) - 1])

    def encoder_layers(self, stage: int) -> list[Layer]:
        layers = [Layer("conv", "conv0", 3, 3, kernel=1, relu=False)]
        cin = 3
        for name in self.conv_names(stage):
            if name.endswith("1") and name != "conv11":
                layers.append(Layer("pool"))
            cout = self.width(stage, name)
            layers.append(Layer("conv", name, cin, cout))
            cin = cout
        return layers

    def decoder_layers(self, stage: int) -> list[Layer]:
        convs = [l for l in self.encoder_layers(stage) if l.kind == "conv" and l.name != "conv0"]
        layers: list[Layer] = []
        for i, enc in enumerate(reversed(convs)):
            last = i == len(convs) - 1
            layers.append(Layer("conv", enc.name, enc.cout, enc.cin, relu=self.decoder_final_relu or not last))
            if enc.name.endswith("1") and enc.name != "conv11":
                layers.append(Layer("up"))
        return layers

    def feature_channels(self, stage: int) -> int:
        return self.width(stage, f"conv{stage}1")

    def teacher_width(self, stage: int, conv: str) -> int:
        """Width of the teacher's ``conv`` in its stage-``stage`` encoder (the Q_k output width)."""
        if self.teacher_widths is None:
            raise ValueError(f"architecture {self.name!r} has no teacher widths")
        return self.teacher_overrides.get((stage, conv), self.teacher_widths[int(conv[4]) - 1])

    def aux_layers(self, stage: int) -> list[Layer]:
        """The 1x1 linear embeddings Q_b (student -> teacher width) of a distillation student."""
        if self.teacher_widths is None:
            return []
        return [
            Layer("conv", f"conv{b}1_aux", self.width(stage, f"conv{b}1"), self.teacher_width(stage, f"conv{b}1"), kernel=1, relu=False)
            for b in range(1, stage + 1)
        ]

    def student(self, name: str, factor: float = 0.5) -> ArchSpec:
        """A thinner student of this architecture: every width times ``factor`` (at least 1).

        The student's Q_k embeddings map back to this architecture's widths, so
        ``ARCHS["cd16x"].student("cd64x")`` is the 64x student of the 16x teacher
        (half the widths, a quarter of the multiply-adds).
        """
        scale = lambda w: max(1, round(w * factor))  # noqa: E731
        return ArchSpec(
            name,
            tuple(scale(w) for w in self.widths),  # type: ignore[arg-type]
            overrides={key: scale(w) for key, w in self.overrides.items()},
            decoder_final_relu=self.decoder_final_relu,
            teacher_widths=self.widths,
            teacher_overrides=dict(self.overrides),
        )

    def macs_per_pixel(self, stage: int, kind: str) -> float:
        """Multiply-adds per image pixel of the stage's ``encoder`` or ``decoder`` (convolutions only)."""
        layers = self.encoder_layers(stage) if kind == "encoder" else self.decoder_layers(stage)
        scale = 1.0 if kind == "encoder" else float(self.grid(stage))
        macs = 0.0
        for layer in layers:
            if layer.kind == "pool":
                scale *= 2
            elif layer.kind == "up":
                scale /= 2
            else:
                macs += layer.cin * layer.cout * layer.kernel**2 / scale**2
        return macs

    def grid(self, stage: int) -> int:
        """Pooling grid of ``stage``: input sizes must be multiples of this."""
        _check_stage(stage)
        return 2 ** (stage - 1)


def _check_stage(stage: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def parse_levels(text: str) -> tuple[int, ...]:
    """``"5,4,3,2,1"`` -> (5, 4, 3, 2, 1), with a clear error for anything else.

    Here, torch-free, for the command line's ``--levels``/``--stages`` (`runtime.cascade` re-exports it).
    """
    items = text.replace(" ", "").split(",")
    if text.strip().endswith(","):  # "5,4," is read as 5,4; an empty item inside ("5,,4") is a typo
        items = items[:-1]
    try:
        levels = tuple(int(t) for t in items)
    except ValueError:
        raise ValueError(f"expected comma-separated stage numbers 1..5, got {text!r}") from None
    if not levels or any(k not in STAGES for k in levels):
        raise ValueError(f"expected comma-separated stage numbers 1..5, got {text!r}")
    return levels


VGG19_WIDTHS = (64, 128, 256, 512, 512)

ARCHS: dict[str, ArchSpec] = {
    "vgg19": ArchSpec("vgg19", VGG19_WIDTHS),
    "cd16x": ArchSpec(
        "cd16x",
        (16, 32, 64, 128, 128),
        overrides={(1, "conv11"): 24},
        decoder_final_relu=True,
        teacher_widths=(64, 128, 256, 512, 512),
    ),
}


ARCHS["cd64x"] = ARCHS["cd16x"].student("cd64x")  # this project's own level: distilled from cd16x (docs/training.md)


def spec_to_dict(spec: ArchSpec) -> dict:
    """A JSON-able description of ``spec`` (``architecture.json`` of a model folder)."""
    return {
        "name": spec.name,
        "widths": list(spec.widths),
        "overrides": [[k, conv, w] for (k, conv), w in sorted(spec.overrides.items())],
        "decoder_final_relu": spec.decoder_final_relu,
        "teacher_widths": list(spec.teacher_widths) if spec.teacher_widths else None,
        "teacher_overrides": [[k, conv, w] for (k, conv), w in sorted(spec.teacher_overrides.items())],
    }


def spec_from_dict(d: dict) -> ArchSpec:
    """Inverse of `spec_to_dict`; raises ValueError naming what is wrong."""
    try:
        widths = tuple(int(w) for w in d["widths"])
        if len(widths) != len(STAGES) or min(widths) < 1:
            raise ValueError(f"widths must be {len(STAGES)} positive integers, got {d['widths']!r}")
        teacher = d.get("teacher_widths")
        return ArchSpec(
            str(d["name"]),
            widths,  # type: ignore[arg-type]
            overrides={(int(k), str(conv)): int(w) for k, conv, w in d.get("overrides", [])},
            decoder_final_relu=bool(d["decoder_final_relu"]),
            teacher_widths=tuple(int(w) for w in teacher) if teacher else None,  # type: ignore[arg-type]
            teacher_overrides={(int(k), str(conv)): int(w) for k, conv, w in d.get("teacher_overrides", [])},
        )
    except (KeyError, TypeError, ArithmeticError) as exc:  # ArithmeticError: int(1e400) of a crafted file
        raise ValueError(f"not an architecture description ({type(exc).__name__}: {exc})") from None


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}") from None
