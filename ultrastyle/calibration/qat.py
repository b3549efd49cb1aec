"""Quantization-aware fine-tuning: float weights whose int8 rendering matches the original fp32 model.

Static int8 calibration (`calibration.quantize`) rounds each network's weights
and activations as they are; the error compounds over the 5-stage cascade.
`finetune_for_int8` adjusts the float weights and biases of every stage
network so that its *simulated* int8 version (fake quantization, as ONNX
Runtime's Q/DQ graphs compute it) reproduces the ORIGINAL fp32 network's
output; the tuned weights are then calibrated and quantized as usual, and the
quality is always measured against the original fp32 model.

The simulation (`FakeQuantNet`) follows the Q/DQ graphs `quantize_graph` writes:

- weights: symmetric int8 per output channel, scale ``max|w| / 127``
  (ONNX Runtime's ``WeightSymmetric``, range [-127, 127]), biases float;
- activations: uint8 asymmetric per tensor (or signed int8, zero-point 0) at
  every convolution's output (ONNX Runtime fuses the ReLU and quantizes the
  conv output; Pad, MaxPool and nearest Resize keep the values on that grid)
  and, for the decoders, at the transformed features ``A f + b``;
- float: the layers `float_nodes` keeps (``ends``: the encoder's first and the
  decoder's last convolution; ``transform``: none but the transform; ``deep``
  also the deepest encoder as a whole).

Activation ranges come from a percentile calibration pass that mirrors ONNX
Runtime's histogram percentile calibrator (2048 bins over [-T, T], 0.005 %
cut from each side at 99.99), recomputed from the weights being tuned. The
gradient passes the rounding straight through (straight-through estimator).

Per stage, the encoder is tuned first (loss: MSE of its fake-quant features
against the fp32 features), then the decoder: its inputs are the *fake-quant*
encoder's features transformed by a WCT map fitted from fake-quant
statistics, as in an int8 run; its target is the fp32 stage's output (fp32
features, fp32 map), so the decoder also learns to absorb what the encoder's
quantization leaves. Activation ranges are re-estimated every
``recalibrate_every`` steps, so the weights adapt to the ranges calibration
will find for them.

Measured (benchmarks/int8_qat.py, see benchmarks/README.md): the simulation
reproduces ONNX Runtime's activation scales exactly and its int8 outputs to
~1/10 of the int8-vs-fp32 error; fine-tuning lowers the held-out simulated
error (encoders 3-4 to 2-2.6x, decoders 1.1-1.5x) and the 5-stage cascade's
PSNR against the original fp32 by about 1 dB (12 pairs: 27.3 -> 28.4 dB at
300 steps per network; 6 pairs: 28.3 -> 29.0 at 100, 29.3 at 300): short of
the 30 dB target, so it is
not wired into ``ultrastyle calibrate``. Tuning encoder and decoder jointly
on the stage output (``joint``) made it worse (27.5 dB at 100 steps). What
weights cannot fix: the per-tensor quantization of the decoders' input
``A f + b`` is the largest single error at stages 1-2 (quantizing only that
tensor gives all of decoder 1's error and half of decoder 2's;
``int8_qat.py --sources``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ultrastyle.core.transforms import FeatureStats, apply_affine, fit_affine
from ultrastyle.models.defaults import DEFAULT_ALPHA
from ultrastyle.models.networks import Encoder, _StageNet, reflect_pad
from ultrastyle.models.pretrained import StyleModel

HIST_BINS = 2048  # ONNX Runtime's HistogramCalibrater default

ProgressCallback = Callable[[str, int, int, dict], None]


# ---------------------------------------------------------------- simulation


@dataclass(frozen=True)
class QuantPlan:
    """Which tensors of one stage network are quantized (names of its convolutions)."""

    weights: tuple[str, ...]  # convs with int8 weights
    outputs: tuple[str, ...]  # convs whose (ReLU'd) output is quantized
    quantize_input: bool  # the network's input (decoders: A f + b)


def quant_plan(net: _StageNet, keep_float: str = "ends") -> QuantPlan:
    """What the Q/DQ graph of ``net`` quantizes under ``keep_float`` (see `quantize.float_nodes`)."""
    convs = tuple(layer.name for layer in net.layers if layer.kind == "conv")
    ends = keep_float in ("ends", "deep")
    if isinstance(net, Encoder):
        return QuantPlan(convs[1:] if ends else convs, convs, quantize_input=not ends)
    return QuantPlan(convs[:-1] if ends else convs, convs[:-1] if ends else convs, quantize_input=True)


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (scale max|w|/127, zero-point 0), straight-through gradient."""
    scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def qparams(lo: float, hi: float, activations: str = "uint8") -> tuple[float, int]:
    """(scale, zero-point) of a calibrated range [lo, hi], as ONNX Runtime computes them."""
    if activations == "uint8":
        rmin, rmax = min(lo, 0.0), max(hi, 0.0)
        scale = (rmax - rmin) / 255.0 or 1.0
        return scale, int(np.clip(round(-rmin / scale), 0, 255))
    amax = max(abs(lo), abs(hi))
    return (2 * amax / 254.0) or 1.0, 0


class FakeQuantNet(nn.Module):
    """A trainable copy of a stage network that runs it as its int8 Q/DQ graph would.

    ``ranges`` (tensor point -> (lo, hi)) are set by `calibrate`; ``"input"``
    is the network's input, a conv's name its output.
    """

    def __init__(self, net: _StageNet, keep_float: str = "ends", activations: str = "uint8") -> None:
        super().__init__()
        self.net = copy.deepcopy(net).float()
        self.plan = quant_plan(net, keep_float)
        self.activations = activations
        self.ranges: dict[str, tuple[float, float]] = {}
        self._q: dict[str, tuple[float, int]] = {}
        self.quantize = True

    def set_ranges(self, ranges: dict[str, tuple[float, float]]) -> None:
        self.ranges = dict(ranges)
        self._q = {k: qparams(lo, hi, self.activations) for k, (lo, hi) in ranges.items()}

    def _act(self, x: torch.Tensor, point: str) -> torch.Tensor:
        if not self.quantize or point not in self._q:
            return x
        scale, zero = self._q[point]
        lo, hi = (0, 255) if self.activations == "uint8" else (-127, 127)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)

    def forward(self, x: torch.Tensor, taps: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
        if self.plan.quantize_input:
            if taps:
                taps("input", x)
            x = self._act(x, "input")
        for layer in self.net.layers:
            if layer.kind == "pool":
                x = F.max_pool2d(x, 2, 2)
            elif layer.kind == "up":
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                conv = getattr(self.net, layer.name)
                if layer.kernel > 1:
                    x = reflect_pad(x, layer.kernel // 2)
                w = fake_quantize_weight(conv.weight) if self.quantize and layer.name in self.plan.weights else conv.weight
                x = F.conv2d(x, w, conv.bias)
                if layer.relu:
                    x = F.relu(x)
                if layer.name in self.plan.outputs:
                    if taps:
                        taps(layer.name, x)
                    x = self._act(x, layer.name)
        return x

    @torch.no_grad()
    def calibrate(self, inputs: Sequence[torch.Tensor], percentile: float = 99.99) -> dict[str, tuple[float, float]]:
        """Percentile ranges of every quantized tensor over ``inputs`` (float forward), then `set_ranges`.

        As ONNX Runtime's percentile calibrator: one histogram of ``HIST_BINS``
        bins over [-T, T] (T the largest |value| seen), ``(100 - percentile) / 2``
        percent cut from each side, the left edge of the bin reached.
        """
        was = self.quantize
        self.quantize = False
        try:
            lo: dict[str, float] = {}
            hi: dict[str, float] = {}

            def extent(name: str, t: torch.Tensor) -> None:
                lo[name] = min(lo.get(name, math.inf), float(t.min()))
                hi[name] = max(hi.get(name, -math.inf), float(t.max()))

            for x in inputs:
                self(x, extent)
            top = {k: max(abs(lo[k]), abs(hi[k])) or 1.0 for k in lo}
            hists = {k: torch.zeros(HIST_BINS, dtype=torch.float64) for k in lo}

            def histogram(name: str, t: torch.Tensor) -> None:
                hists[name] += torch.histc(t.float(), HIST_BINS, -top[name], top[name]).double()

            for x in inputs:
                self(x, histogram)
            cut = (100.0 - percentile) / 200.0
            ranges = {}
            for k, h in hists.items():
                edges = np.linspace(-top[k], top[k], HIST_BINS + 1)
                cdf = np.cumsum(h.numpy() / h.sum().item())
                left = edges[min(np.searchsorted(cdf, cut), HIST_BINS)]
                right = edges[min(np.searchsorted(cdf, 1.0 - cut), HIST_BINS)]
                ranges[k] = (max(float(left), lo[k]), min(float(right), hi[k]))
        finally:
            self.quantize = was
        self.set_ranges(ranges)
        return ranges


# ---------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that determines the fine-tuned weights (recorded in the manifest)."""

    steps: int = 300  # per network; measured: 100 / 300 steps -> +0.7 / +1.0 dB
    batch: int = 2
    tile: int = 192
    lr: float = 1e-5
    seed: int = 0
    keep_float: str = "ends"
    activations: str = "uint8"
    percentile: float = 99.99
    calibration_tiles: int = 4
    alpha: float = DEFAULT_ALPHA
    image_size: int = 1024
    decoder_input: str = "quantized"  # "quantized": fake-quant encoder features and map; "float": fp32 ones
    recalibrate_every: int = 25  # steps between activation-range updates (0: ranges of the original weights)
    joint: bool = False  # the second phase tunes encoder and decoder together on the stage output

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name, ok, want in (("batch", self.batch >= 1, ">= 1"), ("tile", self.tile >= 16, ">= 16 pixels"), ("lr", self.lr > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if self.decoder_input not in ("quantized", "float"):
            raise ValueError(f"decoder_input must be quantized or float, got {self.decoder_input!r}")


@dataclass
class FinetuneReport:
    """Losses per network: fake-quant vs fp32 MSE before and after, on held-out tiles."""

    settings: FinetuneSettings
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "before": self.before, "after": self.after, "seconds": round(self.seconds, 1)}


class _Tiles:
    """Seeded random tiles (B, 3, t, t) cut from a list of images (3, H, W)."""

    def __init__(self, images: Sequence[torch.Tensor], tile: int, seed: int) -> None:
        self.images = [im for im in images if min(im.shape[-2:]) >= 16]
        if not self.images:
            raise ValueError(f"no images to fine-tune on: all {len(images)} are smaller than 16 px on a side; give larger photos"
                             if images else "no images to fine-tune on; give a folder of photos")  # fmt: skip
        self.tile = tile
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` content tiles and ``n`` tiles from other images (the styles)."""
        content, style = [], []
        for _ in range(n):
            i = int(self.rng.integers(len(self.images)))
            j = int(self.rng.integers(len(self.images) - 1)) if len(self.images) > 1 else 0
            j = j + (j >= i) if len(self.images) > 1 else i
            content.append(self._cut(self.images[i], grid))
            style.append(self._cut(self.images[j], grid))
        return torch.stack(content), torch.stack(style)

    def _cut(self, img: torch.Tensor, grid: int) -> torch.Tensor:
        _, h, w = img.shape
        t = min(self.tile, h, w) // grid * grid
        r, c = int(self.rng.integers(h - t + 1)), int(self.rng.integers(w - t + 1))
        return img[:, r : r + t, c : c + t]


def _maps(f: torch.Tensor, fs: torch.Tensor, alpha: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tuple(t.float() for t in fit_affine("wct", FeatureStats.of(f[i]), FeatureStats.of(fs[i]), alpha)) for i in range(len(f))]


def _transform(f: torch.Tensor, maps: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([apply_affine(f[i : i + 1], a, b) for i, (a, b) in enumerate(maps)])


class _StageTuner:
    """Fine-tunes one stage's encoder and decoder against the frozen fp32 pair."""

    def __init__(self, model: StyleModel, stage: int, s: FinetuneSettings, tune_encoder: bool) -> None:
        self.stage, self.s = stage, s
        self.grid = model.arch.grid(stage)
        self.enc, self.dec = model.encoders[stage].eval(), model.decoders[stage].eval()
        for p in (*self.enc.parameters(), *self.dec.parameters()):
            p.requires_grad_(False)
        self.qenc = FakeQuantNet(self.enc, s.keep_float, s.activations)
        self.qenc.quantize = tune_encoder  # "deep": the deepest encoder stays float32
        self.tune_encoder = tune_encoder
        self.qdec = FakeQuantNet(self.dec, s.keep_float, s.activations)

    @torch.no_grad()
    def calibrate(self, tiles: torch.Tensor, styles: torch.Tensor) -> None:
        if self.tune_encoder:
            self.qenc.calibrate([t[None] for t in tiles], self.s.percentile)
        self.qdec.calibrate(list(self._decoder_inputs(tiles, styles)[0].split(1)), self.s.percentile)

    def _decoder_inputs(self, x: torch.Tensor, s: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder input as the int8 run sees it, fp32 stage output: the target).

        ``grad``: the input keeps its graph back to the fake-quant encoder (the
        WCT maps themselves are fitted without gradient).
        """
        with torch.no_grad():
            f, fs = self.enc(x), self.enc(s)
            target = self.dec(_transform(f, _maps(f, fs, self.s.alpha)))
            if self.s.decoder_input == "float":
                return _transform(f, _maps(f, fs, self.s.alpha)), target
            fsq = self.qenc(s)
        with torch.set_grad_enabled(grad):
            fq = self.qenc(x)
            return _transform(fq, _maps(fq.detach(), fsq, self.s.alpha)), target

    def encoder_loss(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref = self.enc(x)
        return F.mse_loss(self.qenc(x), ref) / ref.var().clamp_min(1e-12)

    def decoder_loss(self, x: torch.Tensor, s: torch.Tensor, grad: bool = False) -> torch.Tensor:
        inp, target = self._decoder_inputs(x, s, grad)
        return F.mse_loss(self.qdec(inp), target)

    def train(
        self, net: str, tiles: _Tiles, steps: int, on_step: Callable[[int, float], None], recalibrate: Callable[[], None] | None = None
    ) -> None:
        """``net``: "encoder" (feature loss), "decoder" (stage output loss) or "stage" (both networks, stage output loss)."""
        nets = {"encoder": [self.qenc], "decoder": [self.qdec], "stage": [self.qenc, self.qdec]}[net]
        params = [p for q in nets for p in q.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.s.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        for step in range(steps):
            x, s = tiles.batch(self.s.batch, self.grid)
            loss = self.encoder_loss(x) if net == "encoder" else self.decoder_loss(x, s, grad=net == "stage")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if recalibrate and self.s.recalibrate_every and (step + 1) % self.s.recalibrate_every == 0 and step + 1 < steps:
                recalibrate()  # follow the ranges calibration will find for the weights as they move
            on_step(step, loss.item())
        for p in params:
            p.requires_grad_(False)


def finetune_for_int8(
    model: StyleModel,
    images: Sequence[torch.Tensor],
    settings: FinetuneSettings | None = None,
    *,
    stages: tuple[int, ...] | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[StyleModel, FinetuneReport]:
    """A copy of ``model`` whose stage networks are fine-tuned for int8 (see the module docstring).

    ``images``: (3, H, W) float tensors in [0, 1] (tiles are cut from them,
    seeded); the held-out tiles of the report come from a separate generator.
    ``on_progress(message, done, total, losses)`` is called every step.
    Returns the tuned model (float32, CPU) and the before/after losses.
    """
    s = settings or FinetuneSettings()
    stages = tuple(stages or model.stages)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    tuned = StyleModel(model.name, model.arch, defaults=model.defaults)
    report = FinetuneReport(s)
    deepest = max(model.stages)
    total = 2 * len(stages) * s.steps
    done = 0
    for k in stages:
        tune_encoder = not (s.keep_float == "deep" and k == deepest)
        st = _StageTuner(model, k, s, tune_encoder)
        calib = _Tiles(images, max(s.tile, 256), s.seed + 1000 + k)
        held = _Tiles(images, s.tile, s.seed + 2000 + k)
        cx, cs = calib.batch(s.calibration_tiles, st.grid)
        hx, hs = held.batch(4, st.grid)
        train = _Tiles(images, s.tile, s.seed + k)
        st.calibrate(cx, cs)
        for net in ("encoder", "decoder"):
            name = f"{net}{k}"
            if net == "encoder" and not tune_encoder:
                done += s.steps
                continue
            with torch.no_grad():
                before = float(st.encoder_loss(hx) if net == "encoder" else st.decoder_loss(hx, hs))

            def on_step(step: int, loss: float, name: str = name) -> None:
                nonlocal done
                done += 1
                if on_progress:
                    on_progress(f"fine-tuning {name}", done, total, {"loss": loss})

            phase = "stage" if net == "decoder" and s.joint and tune_encoder else net
            st.train(phase, train, s.steps, on_step, lambda: st.calibrate(cx, cs))
            with torch.no_grad():
                st.calibrate(cx, cs)  # the tuned networks' ranges, as calibration will find them
                after = float(st.encoder_loss(hx) if net == "encoder" else st.decoder_loss(hx, hs))
            report.before[name], report.after[name] = before, after
        tuned.encoders[k] = _plain(st.qenc.net, model.encoders[k])
        tuned.decoders[k] = _plain(st.qdec.net, model.decoders[k])
    report.seconds = time.perf_counter() - t0
    return tuned, report


def _plain(net: _StageNet, like: _StageNet) -> _StageNet:
    out = copy.deepcopy(like).float().cpu()
    out.load_state_dict({k: v.detach().clone() for k, v in net.state_dict().items()})
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()
