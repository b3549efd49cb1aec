"""The TensorRT runner: a bundle's engines for this GPU, tiles in and out through pinned buffers.

Per network (``encoderK``, ``decoderK``, ``decoder_affineK``, ``statsK``):
the engine is deserialised on first use (``trt.Runtime.deserialize_cuda_engine``)
and gets one execution context created with
``ExecutionContextAllocationStrategy.USER_MANAGED``: its activation memory
comes from us. All contexts share one activation arena, since they run one
after another on one stream; before each run the context's input shapes are
set (``set_input_shape``), the memory it needs for those shapes is asked
(``update_device_memory_size_for_shapes``, or the profile-wide
``device_memory_size_v2`` / ``device_memory_size`` where that is missing or
answers 0, its error value),
the arena grows if needed (so it ends up sized for the planned tile, the
largest one the plan makes) and is bound with ``set_device_memory(ptr, size)``
(TensorRT 10.1+; the ``device_memory`` attribute before). Tensors are bound
with ``set_tensor_address`` (its False is an error) and the engine runs with
``execute_async_v3(stream)``. (TensorRT Python API, IExecutionContext and
ICudaEngine; pyCore.cpp in NVIDIA/TensorRT.)

What crosses the PCIe bus per tile:
- ``stylize_core``: the image region in, the stylized region out; the features
  go from the encoder's output buffer straight into ``decoder_affineK``, which
  applies ``A f + b`` on the device (A, b are C² + C floats in);
- ``encode_core_statistics`` (pass 1): the image region in; the encoder's
  features go straight into ``statsK``, which reduces Σf and the centred Σffᵀ
  over the core window on the device (`export.stats_graph`); C + C² + 1
  floats come back (plus the core features only when the pipeline keeps them).

Tensors in and out are host (CPU) torch tensors, like the ONNX Runtime
runner's: the pipeline's canvases are on the host, and this way the runner
needs no CUDA build of PyTorch. Device memory goes through
`trt.device_memory` (cuda-python, or pycuda).

Engines must be fresh for this GPU and TensorRT version (`trt.engines`):
stale or foreign ones are refused with the build command, never run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ultrastyle.core.traits import RunnerTraits
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.errors import Placeholder, Remedy, remedied
from ultrastyle.export.bundle import Bundle, read_bundle
from ultrastyle.export.stats_graph import stats_from_outputs, window_masks
from ultrastyle.runtime.backends.base import Runner, RunnerError, bundle_stages, parse_network
from ultrastyle.trt import engines as eng
from ultrastyle.trt.env import TrtFeatures, detect_features, engine_device_memory, import_tensorrt, require_gpu, tensorrt_logger
from ultrastyle.trt.graphs import GraphError, graph_sources
from ultrastyle.trt.memory_model import memory_factor as trt_memory_factor

CUDA_BINDING_ENV = "ULTRASTYLE_CUDA_BINDING"  # auto | cuda-python | pycuda


@dataclass
class _Network:
    name: str
    engine: object
    context: object
    inputs: list[str]
    outputs: list[str]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    device_memory: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # of the last run's outputs


class TensorRTRunner(Runner):
    """Runs a bundle's TensorRT engines (built by ``ultrastyle build``) on this machine's first GPU."""

    backend = "tensorrt"

    def __init__(
        self, bundle: Bundle | str, *, precision: str = "fp32", stages: tuple[int, ...] | None = None, cuda_binding: str | None = None
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
        stages = bundle_stages(self.bundle, stages or None)
        super().__init__(self.bundle.model_name, self.bundle.arch, stages)
        self.precision = precision
        self.cuda_binding = cuda_binding or os.environ.get(CUDA_BINDING_ENV, "auto")
        self._nets: dict[str, _Network] = {}
        self._buffers: dict[tuple[str, str], object] = {}
        self._pinned: dict[tuple[str, str], object] = {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # tiles cross as host tensors through pinned buffers (see module docstring)

    @property
    def traits(self) -> RunnerTraits:
        """Regions within the engines' profiles (read from their manifest: before activation this needs the GPU's name)."""
        return RunnerTraits(
            budget_memory="device",  # the engines' memory; canvases stay on the host (tiles cross as host arrays)
            bounded_regions=True,  # engine profiles bound each side: `TilingOptions.whole_if_area_fits` stays off
            max_regions=self.profile_max_regions(),  # a stage without engines: `infer` says so when it runs
            memory_factors={k: self.memory_factor(k) for k in self.stages},
            overlap_io=True,  # the GPU computes while the host reads and writes tiles (`runtime.tile_io`); outputs are copies
        )

    def memory_factor(self, stage: int) -> float:
        return trt_memory_factor(self.arch, stage, self.precision)  # (no GPU needed, unlike `traits`)

    # -- lifecycle -----------------------------------------------------------------

    def activate_impl(self) -> None:
        from ultrastyle.trt.device_memory import GrowingBuffer, open_device_memory

        gpu = require_gpu()
        self.trt = trt = import_tensorrt()
        self.features: TrtFeatures = detect_features(trt)
        self.host = eng.Host(gpu.name, gpu.compute_capability, str(trt.__version__))
        self.folder = eng.engine_dir(self.bundle.path, self.host)
        try:
            self.manifest = eng.read_manifest(self.folder)
            sources = graph_sources(self.bundle, self.precision, self.stages)
        except (ValueError, GraphError) as exc:  # its remedy goes with it
            raise remedied(RunnerError(str(exc)), getattr(exc, "remedy", None)) from exc
        stale = []
        for src in sources:
            stale += eng.stale_reasons(self.manifest, self.folder, src.network, self.precision, host=self.host, graph_sha256=src.sha256)
        if stale:
            shown = "; ".join(stale[:3]) + (f"; and {len(stale) - 3} more" if len(stale) > 3 else "")
            fix = Remedy("build_tensorrt", (str(self.bundle.path),), (("precision", self.precision),))
            raise remedied(RunnerError(
                f"TensorRT engines for {self.bundle.path} at {self.precision} are missing or stale on this GPU "
                f"({self.host.folder_name}): {shown}. Build them with {fix.python()}"
            ), fix)  # fmt: skip
        self.logger = tensorrt_logger(trt)  # the process's one logger (the builder's too)
        self.runtime = trt.Runtime(self.logger)
        self.mem = open_device_memory(self.cuda_binding)
        self.stream = self.mem.create_stream()
        self.arena = GrowingBuffer(self.mem)

    def deactivate_impl(self) -> None:
        try:
            self.mem.synchronize(self.stream)
        finally:
            for buf in list(self._buffers.values()) + list(self._pinned.values()) + [self.arena]:
                buf.release()  # type: ignore[attr-defined]
            self._buffers.clear()
            self._pinned.clear()
            self._nets.clear()  # contexts before engines before the runtime: Python drops them in this order
            self.mem.destroy_stream(self.stream)
            self.mem.close()
            self.runtime = None

    def memory_bytes(self) -> int:
        """Device bytes this runner holds: the shared activation arena and every I/O buffer."""
        if not self.is_active:
            return 0
        return self.arena.nbytes + sum(b.nbytes for b in self._buffers.values())  # type: ignore[attr-defined]

    def profile_max_regions(self) -> dict[int, int]:
        """Per stage, the largest tile region (image px) every one of its engines accepts (read before activation too)."""
        out: dict[int, int] = {}
        if self.is_active:
            manifest = self.manifest
        else:
            gpu, trt = require_gpu(), import_tensorrt()
            host = eng.Host(gpu.name, gpu.compute_capability, str(trt.__version__))
            try:
                manifest = eng.read_manifest(eng.engine_dir(self.bundle.path, host))
            except ValueError as exc:  # its remedy goes with it
                raise remedied(RunnerError(str(exc)), getattr(exc, "remedy", None)) from exc
        if manifest is None:
            return out
        for e in manifest.engines.values():
            if e.precision != self.precision:
                continue
            stage = int(e.network[len(e.network.rstrip("0123456789")) :])
            out[stage] = min(out.get(stage, 1 << 30), int(e.tiles["max"]))
        return out

    # -- engines -------------------------------------------------------------------

    def _network(self, name: str) -> _Network:
        if name in self._nets:
            return self._nets[name]
        trt = self.trt
        entry = self.manifest.engines[eng.engine_key(name, self.precision)]  # type: ignore[union-attr]
        engine = self.runtime.deserialize_cuda_engine((self.folder / entry.file).read_bytes())
        if engine is None:
            fix = Remedy("build_tensorrt", (str(self.bundle.path),), (("precision", self.precision), ("force", True)))
            raise remedied(RunnerError(f"TensorRT could not deserialize {self.folder / entry.file}; rebuild with {fix.python()}"), fix)
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:  # TensorRT before 10.0
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise RunnerError(f"TensorRT could not create an execution context for {name}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        for n in names:
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise RunnerError(f"{name}: engine tensor {n!r} is {engine.get_tensor_dtype(n)}, the runner binds float32; rebuild the engines")
        static = {n: tuple(int(d) for d in engine.get_tensor_shape(n)) for n in inputs}
        # Dynamic inputs are bounded by the profile; a static one (A, b) is its own min and max.
        profile = {
            n: tuple(tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(n, 0)) if any(d < 0 for d in shp) else (shp, shp, shp)
            for n, shp in static.items()
        }
        net = _Network(name, engine, context, inputs, outputs, profile, engine_device_memory(engine))  # type: ignore[arg-type]
        self._nets[name] = net
        return net

    def _device_buffer(self, net: str, tensor: str, nbytes: int):
        from ultrastyle.trt.device_memory import GrowingBuffer

        buf = self._buffers.setdefault((net, tensor), GrowingBuffer(self.mem))
        if buf.nbytes < nbytes:  # type: ignore[attr-defined]
            self.mem.synchronize(self.stream)  # queued work may still read the old buffer
            buf.ensure(nbytes)  # type: ignore[attr-defined]
        return buf

    def _pinned_buffer(self, net: str, tensor: str, nbytes: int):
        from ultrastyle.trt.device_memory import GrowingPinned

        pin = self._pinned.setdefault((net, tensor), GrowingPinned(self.mem))
        return pin.ensure(nbytes)  # type: ignore[attr-defined]

    def _check_shape(self, net: _Network, tensor: str, shape: tuple[int, ...]) -> None:
        lo, _, hi = net.profile[tensor]
        if len(shape) == len(lo) and any(s < a for s, a in zip(shape, lo)):
            fix = Remedy("build_tensorrt", (str(self.bundle.path),), (("precision", self.precision), ("tile_min", Placeholder("N"))))
            raise remedied(RunnerError(
                f"{net.name}: input {tensor!r} of shape {tuple(shape)} is below the engine's profile {lo}..{hi}: "
                f"this region (a small image, or an image's edge tile) is smaller than the engines' smallest tile; rebuild with a smaller minimum: "
                f"{fix.python()}"
            ), fix)  # fmt: skip
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            fix = Remedy("build_tensorrt", (str(self.bundle.path),), (("precision", self.precision), ("tile_max", Placeholder("N"))))
            raise remedied(RunnerError(
                f"{net.name}: input {tensor!r} of shape {tuple(shape)} is outside the engine's profile {lo}..{hi}; "
                f"use smaller tiles (tile / max_memory) or rebuild with a larger range: {fix.python()}"
            ), fix)  # fmt: skip

    def _execute(
        self,
        name: str,
        host_inputs: dict[str, np.ndarray],
        device_inputs: dict[str, tuple[int, tuple[int, ...]]] | None = None,
        fetch: tuple[str, ...] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one engine; inputs from host arrays (via pinned buffers) or device pointers; returns fetched outputs."""
        net = self._network(name)
        ctx, mem, stream = net.context, self.mem, self.stream
        device_inputs = device_inputs or {}
        for tensor in net.inputs:
            if tensor in host_inputs:
                arr = np.ascontiguousarray(host_inputs[tensor], dtype=np.float32)
                shape = tuple(arr.shape)
                self._check_shape(net, tensor, shape)
                buf = self._device_buffer(name, tensor, arr.nbytes)
                pin = self._pinned_buffer(name, tensor, arr.nbytes)
                pin.array[: arr.nbytes] = arr.reshape(-1).view(np.uint8)
                mem.copy_htod(buf.ptr, pin, arr.nbytes, stream)
                ptr = buf.ptr
            elif tensor in device_inputs:
                ptr, shape = device_inputs[tensor]
                self._check_shape(net, tensor, shape)
            else:
                raise RunnerError(f"{name}: no value for input {tensor!r}; expected {net.inputs}")
            if not ctx.set_input_shape(tensor, shape):
                raise RunnerError(f"{name}: TensorRT refused input {tensor!r} of shape {shape}")
            self._bind_address(net, tensor, ptr)
        for tensor in net.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(tensor))
            if any(d <= 0 for d in shape):
                raise RunnerError(f"{name}: TensorRT could not infer the shape of output {tensor!r} ({shape}) from the inputs set")
            net.shapes[tensor] = shape
            buf = self._device_buffer(name, tensor, int(np.prod(shape)) * 4)
            self._bind_address(net, tensor, buf.ptr)
        self._bind_activation_memory(net)
        if not ctx.execute_async_v3(stream):
            raise RunnerError(f"{name}: TensorRT execution failed (see TensorRT's log above)")
        fetch = tuple(net.outputs) if fetch is None else fetch
        pins = {}
        for tensor in fetch:
            nbytes = int(np.prod(net.shapes[tensor])) * 4
            pins[tensor] = self._pinned_buffer(name, tensor, nbytes)
            mem.copy_dtoh(pins[tensor], self._buffers[(name, tensor)].ptr, nbytes, stream)  # type: ignore[attr-defined]
        if fetch:
            mem.synchronize(stream)
        return {t: pins[t].view(np.float32, net.shapes[t]).copy() for t in fetch}

    @staticmethod
    def _bind_address(net: _Network, tensor: str, ptr: int) -> None:
        if not net.context.set_tensor_address(tensor, ptr):  # False: a null, misaligned or unknown binding
            raise RunnerError(f"{net.name}: TensorRT refused the device address {ptr:#x} for tensor {tensor!r} (see TensorRT's log above)")

    def _bind_activation_memory(self, net: _Network) -> None:
        """Size the shared arena for this context's current shapes and bind it.

        ``update_device_memory_size_for_shapes`` returns 0 on error
        (NvInferRuntime.h), and may return 0 when the shapes need nothing: in
        both cases the profile-wide size (``device_memory_size_v2``, known to
        cover every shape of the profile) is used instead. The arena always
        holds a valid allocation, so a pointer is bound even for 0 bytes.
        """
        ctx = net.context
        need = int(ctx.update_device_memory_size_for_shapes()) if self.features.memory_for_shapes else 0
        if need <= 0:
            need = net.device_memory
        need = max(need, 1)
        if self.arena.nbytes < need:
            self.mem.synchronize(self.stream)  # an earlier engine on the stream may still use the arena
            self.arena.ensure(need)
        if self.features.sized_set_device_memory:
            ctx.set_device_memory(self.arena.ptr, self.arena.nbytes)
        else:  # TensorRT 10.0
            ctx.device_memory = self.arena.ptr

    def _output_on_device(self, name: str, tensor: str) -> tuple[int, tuple[int, ...]]:
        return self._buffers[(name, tensor)].ptr, self._nets[name].shapes[tensor]  # type: ignore[attr-defined]

    # -- the runner interface ------------------------------------------------------

    def _stage_check(self, stage: int) -> None:
        if stage not in self.stages:
            raise RunnerError(f"{self.name} has no stage {stage}; it has {list(self.stages)}")

    def infer_impl(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, stage = parse_network(network)
        self._stage_check(stage)
        out_name = "features" if kind == "encoder" else "image"
        got = self._execute(network, {k: _as_numpy(v) for k, v in feed.items()}, fetch=(out_name,))
        return {out_name: torch.from_numpy(got[out_name])}

    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        """Encoder -> decoder_affine with the features kept on the device; only the core comes back."""
        self._check_active()
        self._stage_check(stage)
        enc = f"encoder{stage}"
        self._execute(enc, {"image": _as_numpy(image)}, fetch=())
        out = self._execute(
            f"decoder_affine{stage}", {"A": _as_numpy(a), "b": _as_numpy(b)}, {"features": self._output_on_device(enc, "features")}, ("image",)
        )
        return torch.from_numpy(out["image"])[..., rows, cols]

    def encode_core_statistics(
        self, stage: int, image: torch.Tensor, rows: slice, cols: slice, keep_features: bool
    ) -> tuple[FeatureStats, torch.Tensor | None]:
        """Pass 1: the encoder's features go into ``statsK`` on the device; C + C² + 1 numbers come back."""
        self._check_active()
        self._stage_check(stage)
        if image.shape[0] != 1:  # the statistics graph takes one item; tiles are always one
            return super().encode_core_statistics(stage, image, rows, cols, keep_features)
        enc = f"encoder{stage}"
        got = self._execute(enc, {"image": _as_numpy(image)}, fetch=("features",) if keep_features else ())
        ptr, shape = self._output_on_device(enc, "features")
        rm, cm = window_masks(shape[2], shape[3], rows, cols)
        st = self._execute(f"stats{stage}", {"row_mask": rm, "col_mask": cm}, {"features": (ptr, shape)}, ("sum", "outer", "count"))
        stats = stats_from_outputs(st["sum"], st["outer"], st["count"])
        core = torch.from_numpy(got["features"])[..., rows, cols] if keep_features else None
        return stats, core


def _as_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float32)
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
