"""The PyTorch runner: the reference every other backend is checked against."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from ultrastyle.core.traits import EAGER_DEVICE, EAGER_HOST, RunnerTraits
from ultrastyle.errors import Setting, remedied, warn
from ultrastyle.models.pretrained import StyleModel
from ultrastyle.runtime import memory
from ultrastyle.runtime.backends.base import Runner, RunnerError, parse_network
from ultrastyle.runtime.backends.torch_engine import StageEngine, network_dtype

# torch.compile modes that replay CUDA graphs (their outputs are the graph's own buffers, reused by the next replay).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _fp32_exact() -> list[tuple[object, str, object]]:
    """Turn TensorFloat-32 off for cuDNN convolutions and cuBLAS matmuls; returns what `_restore_fp32` puts back.

    PyTorch lets cuDNN run float32 convolutions in TF32 by default (Ampere and
    later; ``torch.backends.cudnn.allow_tf32`` is True): inputs rounded to a
    10-bit mantissa. Measured on an H100 (5-stage CD 16x cascade, 8 MP image):
    with TF32 the GPU result is up to 3.2e-2 off the CPU's float32 one and the
    tiled result 3.7e-2 off the whole-image one; in IEEE float32 5.3e-5 and 0.
    This runner is the float32 reference every backend is held to (1e-4), so
    it runs IEEE float32 while active and restores the caller's settings after
    (the whole-image path was 15-25% faster with TF32; the tiled one no faster).

    Only flags that are on are changed, through the legacy attributes where
    they can be read: those keep PyTorch's legacy and per-operator
    (``fp32_precision``, PyTorch >= 2.9) settings consistent, whereas setting
    only the per-operator ones makes any later read of
    ``torch.backends.cudnn.allow_tf32`` raise. Where the caller has already
    mixed the two APIs (that read raises), the per-operator ones are set.
    """
    changed: list[tuple[object, str, object]] = []
    try:
        flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        on = [(obj, name) for obj, name in flags if getattr(obj, name)]
    except RuntimeError:  # "... used a mix of the legacy and new APIs to set the TF32 flags"
        ops = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
        on = [(obj, "fp32_precision") for obj in ops if obj.fp32_precision != "ieee"]
    for obj, name in on:
        changed.append((obj, name, getattr(obj, name)))
        setattr(obj, name, False if name == "allow_tf32" else "ieee")
    return changed


def _restore_fp32(changed: list[tuple[object, str, object]]) -> None:
    for obj, name, value in reversed(changed):
        setattr(obj, name, value)


class _ProcessSetting:
    """A process-wide setting (torch's thread count, its TF32 flags) that open runners hold: the first to hold it saves
    the process's own value, the last to let go puts it back, whatever order they close in (two Stylizers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._restore: Callable[[], None] | None = None

    def hold(self, apply: Callable[[], Callable[[], None]], again: Callable[[], None] | None = None) -> None:
        """``apply()`` sets the value and returns what restores the process's; ``again`` sets it for a later holder."""
        with self._lock:
            if self._holders == 0:
                self._restore = apply()
            elif again is not None:
                again()
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._restore is not None:
                self._restore()
                self._restore = None


def _set_threads(n: int) -> Callable[[], None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return lambda: torch.set_num_threads(before)


def _ieee_fp32() -> Callable[[], None]:
    changed = _fp32_exact()
    return lambda: _restore_fp32(changed)


_THREADS, _IEEE_FP32 = _ProcessSetting(), _ProcessSetting()


@contextmanager
def ieee_fp32(device: torch.device | str) -> Iterator[None]:
    """IEEE float32 (TF32 off, `_fp32_exact`) while the block runs on CUDA ``device``, shared with open runners; nothing
    on other devices. Tiled equals whole only in IEEE float32 (the optimizer's gradients too)."""
    if torch.device(device).type != "cuda":
        yield
        return
    _IEEE_FP32.hold(_ieee_fp32)
    try:
        yield
    finally:
        _IEEE_FP32.release()


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN sees it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class SlowPrecisionWarning(UserWarning):
    """A precision this device runs far slower than float32 (bfloat16 on a CPU without native bfloat16).

    Measured: `ultrastyle stylize` of a 128 px content with a 512 px style, ``--backend torch``, on a 2-core AVX2 CPU:
    95.7 s in bf16, 4.7 s in fp32.
    """


class TorchRunner(Runner):
    """Runs a `StyleModel`'s modules on the model's device: eagerly in float32 (the reference), or through a `StageEngine`.

    ``precision``: ``fp32`` (the reference), ``bf16``, or ``fp16`` (CUDA only:
    PyTorch's float16 convolutions on the CPU ran 80x slower than float32
    here); the networks run in it, statistics and the affine fit stay float64.
    ``compile``: the stage networks through ``torch.compile`` (one compile per
    network and tile shape, cached on disk under ``$ULTRASTYLE_HOME/cache``),
    with the affine map folded into each decoder's first convolution
    (``fuse_affine``, default: with ``compile``). See `torch_engine`.
    """

    backend = "torch"

    def __init__(
        self,
        model: StyleModel,
        threads: int = 0,
        tf32: bool = False,
        heap_factor: float | None = None,
        *,
        precision: str = "fp32",
        compile: bool = False,
        fuse_affine: bool | None = None,
        compile_mode: str | None = None,
    ) -> None:
        super().__init__(model.name, model.arch, model.stages)
        self.model = model
        self.threads = threads
        self.tf32 = tf32  # True: leave PyTorch's TF32 settings as they are (faster on a GPU, ~1e-3 off the reference)
        network_dtype(precision)  # a typed error for an unknown precision, before anything is copied
        if precision == "fp16" and model.device.type != "cuda":
            raise remedied(RunnerError(
                f"precision='fp16' runs the torch backend on a CUDA device only: on the {model.device.type} PyTorch's "
                "float16 convolutions are tens of times slower than float32; use precision='fp32' there (or 'bf16' on a CPU "
                "with native bfloat16)"
            ), tuple(Setting("precision", p) for p in ("fp16", "fp32", "bf16")))
        if precision == "bf16" and model.device.type == "cpu" and not native_cpu_bf16():
            warn(remedied(SlowPrecisionWarning(
                "precision='bf16' on a CPU without native bfloat16 (AVX512-BF16 or AMX) runs about 20x slower than float32 "
                "(measured on an AVX2 CPU); it checks the half-precision path, it does not speed it up: use precision='fp32' here"
            ), (Setting("precision", "bf16"), Setting("precision", "fp32"))))
        self.precision, self.compile, self.compile_mode = precision, bool(compile), compile_mode
        # The fast paths; None: the float32 eager reference, the model itself.
        self.engine: StageEngine | None = (
            StageEngine(model, precision, compile=compile, fuse_affine=fuse_affine, compile_mode=compile_mode)
            if precision != "fp32" or compile or fuse_affine
            else None
        )
        self._nets: StageEngine | StyleModel = self.engine if self.engine is not None else model
        # What the C heap's retention adds to eager tiles on the CPU (`memory.heap_factor`), read once here,
        # so that this runner's tile plans do not change with later process-wide heap settings.
        self.heap_factor = memory.heap_factor() if heap_factor is None else heap_factor
        self._holds: list[_ProcessSetting] = []  # what `activate_impl` holds, `deactivate_impl` lets go

    @property
    def device(self) -> torch.device:
        return self.model.device

    def activate_impl(self) -> None:
        # The modules are already on their device; only the thread count (and, on CUDA, IEEE float32) is set here:
        # both are the process's, so while two runners are open the last one opened sets the threads.
        if self.threads:
            n = self.threads
            _THREADS.hold(lambda: _set_threads(n), lambda: torch.set_num_threads(n))
            self._holds.append(_THREADS)
        if self.device.type == "cuda" and not self.tf32:
            _IEEE_FP32.hold(_ieee_fp32)
            self._holds.append(_IEEE_FP32)

    def deactivate_impl(self) -> None:
        while self._holds:
            self._holds.pop().release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def infer_impl(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, stage = parse_network(network)
        if stage not in self.model.encoders:
            raise RunnerError(f"{self.name} has no stage {stage}; it has {list(self.stages)}")
        if kind == "encoder":
            return {"features": self._nets.encode(stage, feed["image"])}
        if kind in ("decoder_affine", "decoder_folded"):
            return {"image": self._nets.decode(stage, feed["features"], feed["A"], feed["b"])}
        if self.engine is not None:
            return {"image": self.engine.decode_plain(stage, feed["features"])}
        return {"image": self.model.decoders[stage](feed["features"])}

    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        self._check_active()
        return self._nets.encode_core(stage, image, rows, cols)

    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        self._check_active()
        return self._nets.decode_core(stage, features, a, b, rows, cols)

    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        self._check_active()
        return self._nets.stylize_core(stage, image, a, b, rows, cols)

    def release_memory(self, keep_bytes: int = 0) -> None:
        # PyTorch's CUDA cache: emptied once it holds more than keep_bytes unused (the CPU allocator returns memory itself).
        if self.device.type == "cuda":
            if torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device) > keep_bytes:
                torch.cuda.empty_cache()

    @property
    def traits(self) -> RunnerTraits:
        """Eager PyTorch's, with the heap factor on the CPU (the CUDA allocator's cache is no heap the planner models).

        Compiled: uniform tiles, so each stage's networks see few shapes (one compile each); in a mode that
        replays CUDA graphs, no tile writes behind (`runtime.tile_io`): the next replay overwrites the outputs.
        """
        base = replace(EAGER_HOST, default_memory_factor=self.heap_factor) if self.device.type == "cpu" else EAGER_DEVICE
        if not self.compile:
            return base
        graphs = self.compile_mode in CUDA_GRAPH_MODES
        return replace(base, uniform_tiles=True, overlap_io=base.overlap_io and not graphs, stable_outputs=not graphs)

    def memory_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
