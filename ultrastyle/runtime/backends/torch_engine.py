"""The PyTorch runner's fast paths: stage networks in half precision, through ``torch.compile``, with the affine map fused.

`StageEngine` wraps a `StyleModel` and offers the same calls (``encode``,
``decode``, ``*_core``), float32 tensors in and out, so the cascade and the
tiled pipeline run it unchanged:

- ``precision``: ``fp32``, ``fp16`` or ``bf16``: the networks' weights and
  activations in that dtype (copies; the model itself stays float32, the
  reference). Features come back as float32, so the statistics, the
  eigendecompositions and the affine fit stay float64 as in the reference,
  and ``A f + b`` is applied in float32 before the cast to the decoder's dtype.
- ``compile``: every stage network through ``torch.compile`` (Inductor, which
  fuses padding, convolution, bias and ReLU). Shapes are static
  (``dynamic=False``): one compile per network and input shape, cached in
  memory for the process and on disk (`configure_compile_cache`) across
  processes. Tiles run the whole tile graph and the core is cut out after
  (the halo-skipping crops of ``forward_core`` would make a compile per core
  window); uniform tiles (`RunnerTraits.uniform_tiles`) keep the shapes few.
  Past ``max_shapes`` distinct shapes a network runs eagerly for new shapes.
- ``fuse_affine`` (default: with ``compile``): the map ``A f + b`` folded into
  the decoder's first convolution, ``W' = W A``, ``b' = W b + bias`` (exact:
  the first layer is a reflection pad then a convolution, and a reflection
  pad commutes with a per-pixel map), so the mapped features are never
  written. The folded weights are inputs of the compiled graph, so a new map
  needs no recompile; they are folded in float64 once per (stage, A, b).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ultrastyle.core.transforms import apply_affine
from ultrastyle.errors import RunnerError, warn
from ultrastyle.models.networks import Decoder, reflect_pad
from ultrastyle.models.pretrained import StyleModel

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_PRECISIONS = tuple(DTYPES)
DEFAULT_MAX_SHAPES = 8  # distinct input shapes compiled per network (uniform tiles: 1-3 per stage)
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def network_dtype(precision: str) -> torch.dtype:
    """``"fp16"`` -> torch.float16; a typed error naming the keyword for anything else."""
    if precision not in DTYPES:
        raise RunnerError(f"precision={precision!r} is not one the torch backend runs; choose one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def compile_cache_dir() -> Path:
    """Where compiled kernels persist: ``$ULTRASTYLE_HOME/cache/inductor`` (Inductor's FX graph and Triton caches)."""
    from ultrastyle.models import zoo

    return zoo.home_dir() / "cache" / "inductor"


def configure_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Point Inductor's on-disk caches at ``path`` (default `compile_cache_dir`); returns the folder in effect.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` each time it needs its cache
    folder (``torch._inductor.runtime.cache_dir_utils.cache_dir``); the FX graph
    cache, the autotuning results and Triton's kernels (``<dir>/triton``) live
    under it. A folder the user set in that variable is kept, as is one an
    earlier compile in this process settled on (Inductor writes its default
    into the variable on first use), so all compiles of a process share one.
    """
    current = os.environ.get(COMPILE_CACHE_ENV)
    if current and path is None:
        return Path(current)
    folder = Path(path) if path is not None else compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[COMPILE_CACHE_ENV] = str(folder)
    return folder


def fold_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution ``(weight, bias)`` applied to ``A f + b`` as one convolution of ``f``.

    weight (O, C, kh, kw), bias (O,), A (C, C), b (C,) -> W' (O, C, kh, kw) with
    ``W'[o, i] = Σ_j W[o, j] A[j, i]`` and b' (O,) = ``bias + Σ_{j, y, x} W[o, j, y, x] b[j]``;
    computed in float64, returned in ``weight``'s dtype and device. Exact only
    where the padding before the convolution copies pixels (reflection,
    replication), not where it inserts zeros.
    """
    w64 = weight.to(torch.float64)
    a64, b64 = a.to(w64.device, torch.float64), b.to(w64.device, torch.float64)
    folded = torch.einsum("ojyx,ji->oiyx", w64, a64)
    shift = torch.einsum("ojyx,j->o", w64, b64)
    if bias is not None:
        shift = shift + bias.to(torch.float64)
    return folded.to(weight.dtype), shift.to(weight.dtype)


class FoldedDecoder(nn.Module):
    """A decoder whose first convolution takes its weights as inputs: ``forward(f, w0, b0)`` (N, C, h, w) -> image.

    With ``(w0, b0) = fold_affine(conv0 weights, A, b)`` it computes
    ``decoder(A f + b)``; as inputs rather than parameters, a compiled graph
    serves every map.
    """

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        first = decoder.layers[0]
        if first.kind != "conv":
            raise ValueError(f"the decoder's first layer is {first.kind!r}, not a convolution: the affine map cannot be folded into it")
        self.decoder = decoder
        self.first = first

    def first_conv(self) -> nn.Conv2d:
        conv = getattr(self.decoder, self.first.name)
        assert isinstance(conv, nn.Conv2d)
        return conv

    def forward(self, f: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
        x = reflect_pad(f, self.first.kernel // 2) if self.first.kernel > 1 else f
        x = F.conv2d(x, w0, b0)
        x = F.relu(x) if self.first.relu else x
        for layer in self.decoder.layers[1:]:
            x = self.decoder._layer(layer, x)
        return x


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """``x`` as every call hands it to a compiled graph: contiguous, and an inference tensor (inside inference mode).

    Dynamo guards on strides and dispatch keys as well as shapes: a channels-last tile of a feature canvas, or a plain
    tensor where an inference one came before (the first stage's input, then the previous stage's output), compiled a
    shape it had already compiled again (measured: every stage of a cascade on its second shape, seconds each).
    """
    if x.is_inference() and x.is_contiguous():
        return x
    return x.clone(memory_format=torch.contiguous_format)


class StageEngine:
    """A `StyleModel`'s stage networks in ``precision``, optionally compiled and with the affine map fused.

    Implements the `StageNetworks` calls; tensors in and out are float32 on
    the model's device (features (N, C, h, w), images (N, 3, H, W), A (C, C),
    b (C,) in any float dtype).
    """

    def __init__(
        self,
        model: StyleModel,
        precision: str = "fp32",
        *,
        compile: bool = False,
        fuse_affine: bool | None = None,
        compile_mode: str | None = None,
        max_shapes: int = DEFAULT_MAX_SHAPES,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.model = model
        self.name, self.arch = model.name, model.arch
        self.precision = precision
        self.dtype = network_dtype(precision)
        self.compiled = bool(compile)
        self.fuse_affine = self.compiled if fuse_affine is None else bool(fuse_affine)
        if max_shapes < 1:
            raise RunnerError(f"max_shapes must be at least 1, got {max_shapes}")
        self.max_shapes = max_shapes
        half = self.dtype != torch.float32

        def cast(net: nn.Module) -> nn.Module:  # half: a copy, so the float32 model stays the reference
            return copy.deepcopy(net).to(self.dtype).eval() if half else net

        self.encoders = {k: cast(e) for k, e in model.encoders.items()}
        self.decoders = {k: cast(d) for k, d in model.decoders.items()}
        self.folded = {k: FoldedDecoder(d) for k, d in self.decoders.items()} if self.fuse_affine else {}
        # Distinct input shapes seen per network name ("encoder5", "decoder5"): one compile each.
        self.shapes: dict[str, set[tuple[int, ...]]] = {}
        self.cache_dir: Path | None = None
        self._fns: dict[str, Callable[..., torch.Tensor]] = {}
        self._folds: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._warned: set[str] = set()
        if self.compiled:
            self.cache_dir = configure_compile_cache(cache_dir)
            opts = {"dynamic": False, "fullgraph": True, "mode": compile_mode}
            for k in self.stages:
                self._fns[f"encoder{k}"] = torch.compile(self.encoders[k], **opts)
                dec = self.folded[k] if self.fuse_affine else self.decoders[k]
                self._fns[f"decoder{k}"] = torch.compile(dec, **opts)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def stages(self) -> tuple[int, ...]:
        return self.model.stages

    # --- running one network -------------------------------------------------------------

    def _run(self, name: str, eager: Callable[..., torch.Tensor], x: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        """``eager(x, *args)``, through its compiled graph where this network has one for (or room for) x's shape."""
        fn = self._fns.get(name)
        if fn is None:
            return eager(x, *args)
        seen = self.shapes.setdefault(name, set())
        shape = tuple(x.shape)
        if shape not in seen and len(seen) >= self.max_shapes:
            if name not in self._warned:
                self._warned.add(name)
                warn(
                    f"{name}: more than max_shapes={self.max_shapes} input shapes; new shapes run uncompiled "
                    "(uniform tiles keep the shapes few)"
                )
            return eager(x, *args)
        seen.add(shape)
        # Dynamo counts compiles per code object, and all encoders share Encoder.forward: allow one per network and shape.
        limit = max(DEFAULT_MAX_SHAPES, 2 * len(self.stages) * self.max_shapes)
        with _recompile_limit(limit):
            return fn(_uniform(x), *args)

    def _fold(self, stage: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first convolution folded with (A, b), reused while the same A and b tensors come (every tile of a stage)."""
        hit = self._folds.get(stage)
        # Identity, not values: the cache holds A and b, so their ids stay theirs (inference tensors have no
        # version counter; the pipelines never write into a map once fitted).
        if hit is not None and hit[0] is a and hit[1] is b:
            return hit[2], hit[3]
        conv = self.folded[stage].first_conv()
        w0, b0 = fold_affine(conv.weight, conv.bias, a, b)
        self._folds[stage] = (a, b, w0, b0)
        return w0, b0

    # --- the StageNetworks calls ---------------------------------------------------------

    @torch.inference_mode()
    def encode(self, stage: int, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> relu{stage}_1 features (N, C, H/g, W/g), float32."""
        return self._run(f"encoder{stage}", self.encoders[stage], image.to(self.dtype)).float()

    @torch.inference_mode()
    def decode(self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """decoder(A f + b): (N, C, h, w) -> (N, 3, h*g, w*g), float32."""
        if self.fuse_affine:
            w0, b0 = self._fold(stage, a, b)
            y = self._run(f"decoder{stage}", self.folded[stage], features.to(self.dtype), w0, b0)
        else:  # A f + b in float32 (as the reference), then the decoder's dtype
            y = self._run(f"decoder{stage}", self.decoders[stage], apply_affine(features.float(), a, b).to(self.dtype))
        return y.float()

    @torch.inference_mode()
    def decode_plain(self, stage: int, features: torch.Tensor) -> torch.Tensor:
        """decoder(f) without a map (the runner's ``decoderK`` network), float32."""
        return self.decoders[stage](features.to(self.dtype)).float()

    @torch.inference_mode()
    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        """``encode(stage, image)[..., rows, cols]``; eager runs skip the halo work (`_StageNet.forward_core`)."""
        if self.compiled:
            return self.encode(stage, image)[..., rows, cols]
        return self.encoders[stage].forward_core(image.to(self.dtype), rows, cols).float()

    @torch.inference_mode()
    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        """``decode(stage, features, a, b)[..., rows, cols]``."""
        if self.compiled or self.fuse_affine:
            return self.decode(stage, features, a, b)[..., rows, cols]
        x = apply_affine(features.float(), a, b).to(self.dtype)
        return self.decoders[stage].forward_core(x, rows, cols).float()

    @torch.inference_mode()
    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        """``decode(stage, encode(stage, image), a, b)[..., rows, cols]``."""
        if self.compiled or self.fuse_affine:
            return self.decode(stage, self.encode(stage, image), a, b)[..., rows, cols]
        # The model's halo-skipping composition, run on this engine's encode_core / decode_core.
        return StyleModel.stylize_core(self, stage, image, a, b, rows, cols)  # type: ignore[arg-type]

    def compile_count(self) -> int:
        """Compiled (network, shape) pairs so far (0 when not compiling)."""
        return sum(len(s) for s in self.shapes.values()) if self.compiled else 0


def _recompile_limit(limit: int):  # noqa: ANN202 - a config-patch context manager
    """``torch._dynamo.config.patch(recompile_limit=limit)`` where that knob exists (older: ``cache_size_limit``)."""
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            return dynamo_config.patch(**{key: max(limit, getattr(dynamo_config, key))})
    return nullcontext()
