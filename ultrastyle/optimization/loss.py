"""The Gatys et al. loss on a compressed encoder, and its exact gradient tile by tile.

For an image G (3, H, W) in [0, 1], padded to the encoder's grid by the one
rule of `core.padding` (mirrored at the bottom/right edge), the loss is

    L = α · L_content + β · Σ_l λ_l · L_style^l
    L_content = ½ Σ_p ‖a_C(p) − a_G(p)‖² / N_c          (at one layer, the content layer)
    L_style^l = ‖Gram_S^l − Gram_G^l‖_F²,  Gram^l = Σ_p a(p) a(p)ᵀ / N_l   (no mean subtracted)

over the taps relu1_1..relu{k}_1 of the encoder; ``p`` runs over the N_l
feature positions of the padded image at layer l. The content term is divided
by N_c (Gatys et al. sum it) so that α and β mean the same at every scale of a
coarse-to-fine run; the style term is the issue's definition as it stands.

The style term depends on the image only through the global sums Σ a aᵀ; its
derivative with respect to one feature position is local once they are known:

    ∂L/∂a_l(p) = −(4 β λ_l / N_l) (Gram_S^l − Gram_G^l) a_l(p)  [+ α (a_G(p) − a_C(p)) / N_c at the content layer]

So one evaluation is two passes over tiles (`loss_and_gradient`):

1. pass 1 runs the encoder over each tile's region (its core grown by the
   encoder's receptive-field halo, reflection only at the true image border)
   and accumulates, in float64, Σ a aᵀ over the feature positions of the
   core at every tap, and the content term there; each position counts once;
2. pass 2 runs forward and backward per tile with those Grams held
   constant: the upstream gradient above is fed into the core's feature
   positions only, and the input gradient of the whole region is *added* into
   the gradient canvas. Summed over tiles, every image pixel receives the
   contribution of every feature position exactly once, each computed exactly.

This is the "scatter" form of the exact tiled gradient. The "gather" form
keeps only core pixels' gradients, which needs every feature position whose
receptive field touches the core, each computed exactly: regions of core +
4 × radius instead of core + 2 × radius (at a 512-px core and the 16x
encoder's 80-px halo: 2.9x the core's area per tile instead of 1.8x). The
scatter form pays a read-add-write of each region's gradient instead.

A plan of one tile is the whole image: one forward with autograd, the Grams
from its taps, one backward (`reference_loss` is the plain-autograd formula
the tests hold both to).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from ultrastyle.core.canvas import Canvas
from ultrastyle.core.padding import pad_to_grid, padded_size, reflect_index
from ultrastyle.core.receptive import encoder_radius, needed_windows, round_up
from ultrastyle.core.tiling import Tile, plan_tiles
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.models.networks import Encoder
from ultrastyle.optimization.constants import DEFAULT_CONTENT_LAYER, DEFAULT_CONTENT_WEIGHT, DEFAULT_STYLE_WEIGHT
from ultrastyle.runtime.memory import release_free_memory

TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

TileCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LossWeights:
    """α (``content_weight``), β (``style_weight``), λ_l per tap (``layer_weights``, default 1 each) and the content layer."""

    content_weight: float = DEFAULT_CONTENT_WEIGHT
    style_weight: float = DEFAULT_STYLE_WEIGHT
    layer_weights: Mapping[str, float] | None = None
    content_layer: str = DEFAULT_CONTENT_LAYER

    def weight(self, tap: str) -> float:
        if self.layer_weights is None:
            return 1.0
        return float(self.layer_weights.get(tap, 0.0))


class LossNetwork:
    """The taps relu1_1..relu{k}_1 of an encoder (CD 16x ``5SE``: all five), run on tiles with only what a core needs.

    ``encoder``: any `Encoder` (a CD stage-5 encoder, a VGG-19 from the
    converters); its parameters are frozen. Images are (1, 3, h, w) with h, w
    multiples of `grid`.
    """

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.layers = encoder.layers
        self.spec, self.stage = encoder.spec, encoder.stage
        self.grid = self.spec.grid(self.stage)
        # Tap name -> index of its layer in ``layers`` (the conv whose ReLU output it is).
        self.tap_layer = {
            f"relu{layer.name[4]}_1": i
            for i, layer in enumerate(self.layers)
            if layer.kind == "conv" and layer.name.endswith("1") and layer.name != "conv0"
        }
        self.taps = tuple(self.tap_layer)
        self.halo = round_up(encoder_radius(self.spec, self.stage), self.grid)

    def channels(self, tap: str) -> int:
        return self.layers[self.tap_layer[tap]].cout

    def scale(self, tap: str) -> int:
        """Image pixels per feature pixel of ``tap`` (a power of two)."""
        return 2 ** sum(1 for layer in self.layers[: self.tap_layer[tap]] if layer.kind == "pool")

    @property
    def device(self) -> torch.device:
        return self.encoder.conv0.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv0.weight.dtype

    def tap_core(self, x: torch.Tensor, rows: slice, cols: slice, taps: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Per tap, the features of the core ``x[..., rows, cols]`` only: (1, C_l, core_h / s_l, core_w / s_l).

        ``x``: a tile region (1, 3, h, w) whose origin lies on the grid; ``rows``,
        ``cols``: the core in it (on the grid). As `Encoder.forward_core`, every
        tensor is cropped after its layer to what the remaining taps need, kept
        on the remaining pooling grid; values near a crop edge are wrong only
        where no tap's core depends on them, so gradients never reach them.
        Differentiable with respect to ``x``.
        """
        taps = tuple(taps or self.taps)
        last = max(self.tap_layer[t] for t in taps)
        layers = self.layers[: last + 1]
        h, w = x.shape[-2:]
        win_r = self._windows(layers, taps, rows, h)
        win_c = self._windows(layers, taps, cols, w)
        r0, c0 = win_r[0][0], win_c[0][0]
        x = x[..., r0 : win_r[0][1], c0 : win_c[0][1]]
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers):
            x = self.encoder._layer(layer, x)
            if layer.kind == "pool":
                r0, c0 = r0 // 2, c0 // 2
            (rs, re), (cs, ce) = win_r[i + 1], win_c[i + 1]
            x = x[..., rs - r0 : re - r0, cs - c0 : ce - c0]
            r0, c0 = rs, cs
            for t in taps:
                if self.tap_layer[t] == i:
                    s = self.scale(t)
                    out[t] = x[..., rows.start // s - r0 : rows.stop // s - r0, cols.start // s - c0 : cols.stop // s - c0]
        return out

    def _windows(self, layers: list, taps: Sequence[str], core: slice, size: int) -> list[tuple[int, int]]:
        """Per tensor (input, each layer's output), the union of what every tap's core needs, on the grid of the deepest pool after it."""
        union: list[tuple[int, int] | None] = [None] * (len(layers) + 1)
        for t in taps:
            i, s = self.tap_layer[t], self.scale(t)  # the core in the tap's own pixels
            for j, (a, b) in enumerate(needed_windows(layers[: i + 1], core.start // s, core.stop // s, size)):
                u = union[j]
                union[j] = (a, b) if u is None else (min(u[0], a), max(u[1], b))
        out = []
        n = size
        for j, u in enumerate(union):
            if j > 0 and layers[j - 1].kind == "pool":
                n //= 2
            g = 2 ** sum(1 for layer in layers[j:] if layer.kind == "pool")
            a, b = u if u is not None else (0, 0)
            out.append((a // g * g, min(n, -(-b // g) * g)))
        return out


@dataclass
class StyleTarget:
    """What the loss compares against: the style's Grams (float64 (C, C) per tap) and the content features.

    ``content``: the content layer's features of the (padded) content image,
    a canvas (C, Hp / s, Wp / s), or None for no content term.
    """

    grams: dict[str, torch.Tensor]
    content: Canvas | None = None


@dataclass
class LossValue:
    """One evaluation: the total, its parts (style per tap, unweighted), and the image's Grams."""

    total: float
    content: float
    style: dict[str, float]
    grams: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def style_total(self) -> float:
        return float(sum(self.style.values()))


@dataclass(frozen=True)
class GradientPlan:
    """Tiles of one image size: cores on the grid over the padded image, regions grown by the encoder's halo."""

    height: int  # the image's
    width: int
    padded_height: int
    padded_width: int
    tiles: tuple[Tile, ...]

    @property
    def one_tile(self) -> bool:
        return len(self.tiles) == 1


def plan_gradient(net: LossNetwork, height: int, width: int, core: int | None) -> GradientPlan:
    """Tiles of at most ``core`` px (rounded to the grid) for a ``height`` x ``width`` image; None: one tile."""
    g = net.grid
    hp, wp = padded_size(height, g), padded_size(width, g)
    side = max(hp, wp) if core is None else max(g, core // g * g)
    return GradientPlan(height, width, hp, wp, tuple(plan_tiles(hp, wp, side, net.halo, g)))


def read_tile(src: Canvas, rows: tuple[int, int], cols: tuple[int, int], net: LossNetwork) -> torch.Tensor:
    """(1, 3, rows, cols) of the grid-padded image: indices past the edge mirrored in (`core.padding`), in the net's dtype."""
    _, h, w = src.shape
    r = reflect_index(torch.arange(*rows), h).numpy()
    c = reflect_index(torch.arange(*cols), w).numpy()
    return src.read_tensor(r, c, net.device)[None].to(net.dtype)


def add_tile_gradient(grad: Canvas, block: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """``grad[:, reflect(rows), reflect(cols)] += block`` (3, r, c): mirrored pixels fold back onto their sources."""
    _, h, w = grad.shape
    r = reflect_index(torch.arange(*rows), h)
    c = reflect_index(torch.arange(*cols), w)
    r_lo, r_hi, c_lo, c_hi = int(r.min()), int(r.max()) + 1, int(c.min()), int(c.max()) + 1
    block = block.detach().to("cpu", torch.float64)
    folded = torch.zeros(block.shape[0], r_hi - r_lo, block.shape[2], dtype=torch.float64).index_add_(1, r - r_lo, block)
    folded = torch.zeros(block.shape[0], r_hi - r_lo, c_hi - c_lo, dtype=torch.float64).index_add_(2, c - c_lo, folded)
    old = torch.from_numpy(grad.read(slice(r_lo, r_hi), slice(c_lo, c_hi)))
    grad.write(r_lo, c_lo, (old.double() + folded).float().numpy())


def _style_coefficients(net: LossNetwork, weights: LossWeights, target: StyleTarget, grams: Mapping[str, torch.Tensor], counts: Mapping[str, int]):
    """Per tap: the loss term ‖D‖² and the matrix M with ∂L/∂a(p) = M a(p) (float64), D = Gram_S − Gram_G."""
    out = {}
    for t in net.taps:
        lam = weights.weight(t)
        d = target.grams[t] - grams[t]
        out[t] = (float((d * d).sum()), (-4.0 * weights.style_weight * lam / counts[t]) * d, lam)
    return out


def _upstream(
    net: LossNetwork, taps: Mapping[str, torch.Tensor], coef: Mapping, weights: LossWeights, content: torch.Tensor | None, n_content: int
) -> list[torch.Tensor]:
    """∂L/∂a at every tap's core positions (the taps' dtype), Grams held constant."""
    grads = []
    for t, a in taps.items():
        m = coef[t][1].to(a.device, a.dtype)
        g = torch.einsum("ij,njhw->nihw", m, a.detach())
        if t == weights.content_layer and content is not None:
            g = g + (weights.content_weight / n_content) * (a.detach() - content)
        grads.append(g)
    return grads


def _content_term(a: torch.Tensor, content: torch.Tensor) -> float:
    return float(((a.detach().double() - content.double()) ** 2).sum())


def _content_block(target: StyleTarget, net: LossNetwork, weights: LossWeights, t: Tile, dtype: torch.dtype) -> torch.Tensor | None:
    if target.content is None or weights.content_weight == 0:
        return None
    s = net.scale(weights.content_layer)
    block = target.content.read_tensor(slice(t.rows.start // s, t.rows.stop // s), slice(t.cols.start // s, t.cols.stop // s), net.device)
    return block[None].to(dtype)


def _totals(
    net: LossNetwork, weights: LossWeights, target: StyleTarget, stats: Mapping[str, FeatureStats], content_sum: float
) -> tuple[LossValue, dict]:
    grams = {t: stats[t].outer / stats[t].count for t in net.taps}
    counts = {t: stats[t].count for t in net.taps}
    coef = _style_coefficients(net, weights, target, grams, counts)
    n_c = counts[weights.content_layer]
    content = 0.5 * content_sum / n_c if target.content is not None else 0.0
    style = {t: coef[t][0] for t in net.taps}
    total = weights.content_weight * content + weights.style_weight * sum(coef[t][2] * style[t] for t in net.taps)
    return LossValue(total, content, style, grams), coef


def feature_statistics(
    net: LossNetwork, image: Canvas, plan: GradientPlan, *, keep: tuple[str, Canvas] | None = None,
    target: StyleTarget | None = None, weights: LossWeights | None = None, on_tile: TileCallback | None = None,
) -> tuple[dict[str, FeatureStats], float]:
    """Pass 1: float64 Σ a aᵀ over every tile's core per tap, and Σ ‖a_C − a‖² at the content layer when ``target`` has content.

    ``keep``: (tap, canvas) to store that tap's core features into (the content features).
    """
    stats = {t: FeatureStats.empty(net.channels(t)) for t in net.taps}
    content_sum = 0.0
    with torch.no_grad():
        for i, t in enumerate(plan.tiles):
            x = read_tile(image, (t.region_rows.start, t.region_rows.stop), (t.region_cols.start, t.region_cols.stop), net)
            taps = net.tap_core(x, *t.core_in_region)
            for name, a in taps.items():
                stats[name] = stats[name] + gram_sums(a)
            if keep is not None:
                name, canvas = keep
                s = net.scale(name)
                canvas.write_tensor(t.rows.start // s, t.cols.start // s, taps[name][0].float())
            if target is not None and weights is not None:
                c = _content_block(target, net, weights, t, x.dtype)
                if c is not None:
                    content_sum += _content_term(taps[weights.content_layer], c)
            _after_tile(plan)
            if on_tile:
                on_tile("loss", i + 1, len(plan.tiles))
    return stats, content_sum


def evaluate(
    net: LossNetwork, image: Canvas, target: StyleTarget, weights: LossWeights, plan: GradientPlan,
    on_tile: TileCallback | None = None,
) -> LossValue:
    """The loss alone (pass 1), e.g. for a line search's trial point."""
    stats, content_sum = feature_statistics(net, image, plan, target=target, weights=weights, on_tile=on_tile)
    return _totals(net, weights, target, stats, content_sum)[0]


def loss_and_gradient(
    net: LossNetwork, image: Canvas, target: StyleTarget, weights: LossWeights, plan: GradientPlan, grad: Canvas,
    *, known: LossValue | None = None, on_tile: TileCallback | None = None,
) -> LossValue:
    """The loss at ``image`` (3, H, W) and its exact gradient, written into ``grad`` (3, H, W).

    ``known``: this image's `evaluate` result, when a line search has just
    computed it (pass 1 is then skipped). One tile: one forward and one
    backward over the whole image.
    """
    if plan.one_tile and known is None:
        return _whole_image(net, image, target, weights, plan, grad)
    value = known if known is not None else evaluate(net, image, target, weights, plan, on_tile)
    counts = {}
    for t in net.taps:
        s = net.scale(t)
        counts[t] = (plan.padded_height // s) * (plan.padded_width // s)
    coef = _style_coefficients(net, weights, target, value.grams, counts)
    _zero(grad)
    for i, t in enumerate(plan.tiles):
        rows, cols = (t.region_rows.start, t.region_rows.stop), (t.region_cols.start, t.region_cols.stop)
        x = read_tile(image, rows, cols, net).requires_grad_(True)
        with torch.enable_grad():
            taps = net.tap_core(x, *t.core_in_region)
            content = _content_block(target, net, weights, t, x.dtype)
            grads = _upstream(net, taps, coef, weights, content, counts[weights.content_layer])
            torch.autograd.backward(list(taps.values()), grads)
        add_tile_gradient(grad, x.grad[0], rows, cols)
        del x, taps, grads
        _after_tile(plan)
        if on_tile:
            on_tile("gradient", i + 1, len(plan.tiles))
    return value


def _after_tile(plan: GradientPlan) -> None:
    """Between tiles: freed heap memory back to the OS, so one tile's activations are all a pass holds.

    (The command line keeps freed memory in glibc's heap, `runtime.memory.keep_freed_memory`;
    without trims the resident set would grow by the heap's fragmentation tile after tile.)
    """
    if len(plan.tiles) > 1:
        release_free_memory()


def _whole_image(net: LossNetwork, image: Canvas, target: StyleTarget, weights: LossWeights, plan: GradientPlan, grad: Canvas) -> LossValue:
    """The one-tile case: one forward with autograd, Grams from its taps, one backward."""
    (t,) = plan.tiles
    rows, cols = (0, plan.padded_height), (0, plan.padded_width)
    x = read_tile(image, rows, cols, net).requires_grad_(True)
    with torch.enable_grad():
        taps = net.tap_core(x, *t.core_in_region)
        stats = {name: gram_sums(a) for name, a in taps.items()}
        content = _content_block(target, net, weights, t, x.dtype)
        csum = _content_term(taps[weights.content_layer], content) if content is not None else 0.0
        value, coef = _totals(net, weights, target, stats, csum)
        grads = _upstream(net, taps, coef, weights, content, stats[weights.content_layer].count)
        torch.autograd.backward(list(taps.values()), grads)
    _zero(grad)
    add_tile_gradient(grad, x.grad[0], rows, cols)
    return value


def gram_sums(a: torch.Tensor, band_pixels: int = 1 << 16) -> FeatureStats:
    """Count and Σ a aᵀ (float64 (C, C)) of features (1, C, h, w), in row bands of about ``band_pixels``; ``sum`` is left 0.

    No centring is needed (the Gram is not centred); float64 products of
    float32 features are exact, so the sums differ between tilings only by
    the order of float64 additions.
    """
    f = a.detach()[0]
    c, h, w = f.shape
    outer = torch.zeros(c, c, dtype=torch.float64, device=f.device)
    step = max(1, band_pixels // max(1, w))
    for r in range(0, h, step):
        band = f[:, r : r + step].reshape(c, -1).double()
        outer += band @ band.T
    return FeatureStats(h * w, torch.zeros(c, dtype=torch.float64), outer.cpu())


def _zero(canvas: Canvas, band: int = 256) -> None:
    c, h, w = canvas.shape
    for r in range(0, h, band):
        canvas.write(r, 0, np.zeros((c, min(band, h - r), w), np.float32))


def style_target(
    net: LossNetwork, style: Canvas, content: Canvas | None, weights: LossWeights, core: int | None,
    content_features: Canvas | None = None, on_tile: TileCallback | None = None, style_core: int | None | Literal["same"] = "same",
) -> StyleTarget:
    """The style's Grams (pass 1 over ``style``) and the content layer's features of ``content`` (into ``content_features``).

    ``content_features``: a canvas (C, Hp / s, Wp / s) for the content layer's
    features (made in RAM when None). ``core``: tile core side (None: whole);
    ``style_core``: the style pass's, when it differs ("same": ``core``).
    """
    _, sh, sw = style.shape
    s_core = core if style_core == "same" else style_core
    stats, _ = feature_statistics(net, style, plan_gradient(net, sh, sw, s_core), on_tile=on_tile)
    grams = {t: stats[t].outer / stats[t].count for t in net.taps}
    feats = None
    if content is not None and weights.content_weight != 0:
        _, h, w = content.shape
        plan = plan_gradient(net, h, w, core)
        s = net.scale(weights.content_layer)
        feats = content_features or Canvas(net.channels(weights.content_layer), plan.padded_height // s, plan.padded_width // s)
        feature_statistics(net, content, plan, keep=(weights.content_layer, feats), on_tile=on_tile)
    return StyleTarget(grams, feats)


def reference_loss(
    net: LossNetwork, image: torch.Tensor, style: torch.Tensor, content: torch.Tensor | None, weights: LossWeights
) -> torch.Tensor:
    """The loss of the module docstring by plain autograd on whole images (3, H, W), differentiable in ``image``.

    The semantics every tiled evaluation is tested against; memory grows with the image.
    """

    def taps(img: torch.Tensor) -> dict[str, torch.Tensor]:
        got = net.encoder.taps(pad_to_grid(img[None].to(net.dtype), net.grid))
        return {t: got[t] for t in net.taps}

    def gram(a: torch.Tensor) -> torch.Tensor:
        f = a.flatten(2)[0]
        return f @ f.T / f.shape[1]

    with torch.no_grad():
        style_grams = {t: gram(a) for t, a in taps(style).items()}
        content_feats = taps(content)[weights.content_layer] if content is not None else None
    got = taps(image)
    loss = image.new_zeros((), dtype=net.dtype)
    for t, a in got.items():
        loss = loss + weights.style_weight * weights.weight(t) * ((style_grams[t] - gram(a)) ** 2).sum()
    if content_feats is not None:
        a = got[weights.content_layer]
        loss = loss + weights.content_weight * 0.5 * ((a - content_feats) ** 2).sum() / (a.shape[-2] * a.shape[-1])
    return loss
