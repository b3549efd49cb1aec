"""A stand-in for TensorRT and CUDA that runs the engines' ONNX graphs with ONNX Runtime (no tests here).

It exposes the API surface ultrastyle uses, with TensorRT 10/11 names
(``create_network``, ``OnnxParser``, ``build_serialized_network``,
``deserialize_cuda_engine``, ``create_execution_context(USER_MANAGED)``,
``set_input_shape``, ``set_tensor_address``, ``update_device_memory_size_for_shapes``,
``set_device_memory``, ``execute_async_v3``) and a device memory whose
"pointers" index host arrays. It refuses what the real ones refuse, the way
they refuse it (a False, a None, an error through the logger; an assertion
only for what would be undefined behaviour on a GPU):

- the parser applies TensorRT's operator support matrix and importer rules
  (`ultrastyle.trt.check.check_model`, TensorRT's rules only) and reports
  through ``num_errors`` / ``get_error(i)`` (``desc()``, ``node()``);
- the builder validates the profile: every dynamic input covered, fixed
  dimensions kept, min <= opt <= max (``set_shape`` raises, as the binding
  does), inputs sharing a named dimension given the same range;
- engines report their I/O dtypes from the graph (HALF, INT8, ...), run with
  TF32 emulated where the build left TF32 on (the inputs of every Conv /
  MatMul / Gemm rounded to 10 mantissa bits, as TF32 tensor cores do), and
  size activation memory by the shapes set;
- one logger per process: a Builder, parser or Runtime given another one
  while the first is in use is noted as TensorRT warns (NVIDIA/TensorRT#1475);
  its own ``Logger`` prints to stdout, like pyCore.cpp's ``DefaultLogger``;
- timing caches: bytes that are not one of its caches are refused
  (``set_timing_cache`` returns False and ``get_timing_cache`` stays None);
- faults on request (`Faults`, ``install(monkeypatch, **faults)``): 0 from
  ``update_device_memory_size_for_shapes``, None from
  ``deserialize_cuda_engine``, False from ``set_tensor_address``.

``install(api="10.0")`` gives the TensorRT 10.0 surface (``device_memory``
attribute instead of ``set_device_memory``, ``device_memory_size`` instead of
``device_memory_size_v2``); ``install(memory="cuda-python" | "pycuda")`` keeps
ultrastyle's real `CudaPythonMemory` / `PyCudaMemory` and gives them stand-in
``cuda.bindings.runtime`` / ``pycuda.driver`` modules over the same fake device.

So the builder, the engine folder logic and the runner's data flow (pinned
buffers, features kept "on the device" between engines, the statistics graph)
run on a CPU; whether TensorRT itself agrees is what the GPU tests check.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import sys
import types
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ultrastyle.trt.device_memory import DeviceBuffer, DeviceMemory, HostBuffer
from ultrastyle.trt.env import GpuInfo

FAKE_GPU = GpuInfo(0, "Fake GPU 9000", (9, 0), 80 * 2**30, "12.8", "570.0")
_ids = itertools.count(1 << 20, 1 << 12)
DEVICE: dict[int, np.ndarray] = {}
WRITTEN: set[int] = set()
PINNED: dict[int, np.ndarray] = {}


@dataclass(frozen=True)
class Faults:
    """What the stand-in is told to do wrong, as the real API may."""

    memory_for_shapes_zero: bool = False  # update_device_memory_size_for_shapes() -> 0 (its error value)
    deserialize_none: bool = False  # Runtime.deserialize_cuda_engine() -> None
    refuse_address: str | None = None  # set_tensor_address(name, ...) -> False for this tensor
    set_device_error: int = 0  # cuda-python's cudaSetDevice error (35: the driver is too old for its CUDA)


FAULTS = Faults()


class _LoggerState:
    def __init__(self) -> None:
        self.first = None  # the logger TensorRT keeps
        self.conflicts: list[str] = []  # what it warns when handed another one
        self.messages: list[tuple[int, str]] = []  # everything the stand-in logged


LOGGERS = _LoggerState()


# -- device memory ------------------------------------------------------------------------


def _alloc(nbytes: int) -> int:
    ptr = next(_ids)
    DEVICE[ptr] = np.zeros(max(nbytes, 1), np.uint8)
    return ptr


def _free(ptr: int) -> None:
    del DEVICE[ptr]
    WRITTEN.discard(ptr)


class FakeMemory(DeviceMemory):
    name = "fake"

    def __init__(self, *_a) -> None:
        self.streams = 0

    def alloc(self, nbytes: int) -> DeviceBuffer:
        return DeviceBuffer(_alloc(nbytes), nbytes)

    def free(self, buf: DeviceBuffer) -> None:
        _free(buf.ptr)

    def alloc_pinned(self, nbytes: int) -> HostBuffer:
        arr = np.zeros(max(nbytes, 1), np.uint8)
        return HostBuffer(arr, int(arr.ctypes.data))

    def free_pinned(self, buf: HostBuffer) -> None:
        pass

    def create_stream(self) -> int:
        self.streams += 1
        return 7

    def destroy_stream(self, stream: int) -> None:
        self.streams -= 1

    def copy_htod(self, dst: int, src: HostBuffer, nbytes: int, stream: int) -> None:
        DEVICE[dst][:nbytes] = src.array[:nbytes]
        WRITTEN.add(dst)

    def copy_dtoh(self, dst: HostBuffer, src: int, nbytes: int, stream: int) -> None:
        assert src in WRITTEN, "device-to-host copy of a buffer nothing wrote"
        dst.array[:nbytes] = DEVICE[src][:nbytes]

    def synchronize(self, stream: int) -> None:
        pass

    def mem_info(self) -> tuple[int, int]:
        used = sum(a.nbytes for a in DEVICE.values())
        return FAKE_GPU.total_memory - used, FAKE_GPU.total_memory


def _cudart_module() -> types.ModuleType:
    """``cuda.bindings.runtime`` as cuda-python has it: every call returns ``(error, *values)``."""
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
    errors = {35: "CUDA driver version is insufficient for CUDA runtime version", 2: "out of memory"}

    def copy(dst, src, nbytes, kind, stream):
        if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice:
            DEVICE[dst][:nbytes] = np.frombuffer(ctypes.string_at(src, nbytes), np.uint8)
            WRITTEN.add(dst)
        else:
            assert src in WRITTEN, "device-to-host copy of a buffer nothing wrote"
            ctypes.memmove(dst, DEVICE[src].ctypes.data, nbytes)
        return (0,)

    def malloc_host(n):
        arr = np.zeros(n, np.uint8)
        PINNED[int(arr.ctypes.data)] = arr
        return (0, int(arr.ctypes.data))

    used = lambda: sum(a.nbytes for a in DEVICE.values())  # noqa: E731
    rt.cudaSetDevice = lambda device: (FAULTS.set_device_error,)
    rt.cudaGetErrorString = lambda err: (0, errors.get(int(err), "unknown error").encode())
    rt.cudaMalloc = lambda n: (0, _alloc(n))
    rt.cudaFree = lambda ptr: (_free(ptr), 0)[1:]
    rt.cudaMallocHost = malloc_host
    rt.cudaFreeHost = lambda ptr: (PINNED.pop(ptr), 0)[1:]
    rt.cudaStreamCreate = lambda: (0, 7)
    rt.cudaStreamDestroy = lambda s: (0,)
    rt.cudaMemcpyAsync = copy
    rt.cudaStreamSynchronize = lambda s: (0,)
    rt.cudaMemGetInfo = lambda: (0, FAKE_GPU.total_memory - used(), FAKE_GPU.total_memory)
    return rt


def _pycuda_driver_module() -> types.ModuleType:
    """``pycuda.driver``: allocations are objects (``int()`` is the pointer), streams carry a handle."""
    drv = types.ModuleType("pycuda.driver")

    class Alloc:
        def __init__(self, n: int) -> None:
            self.ptr = _alloc(n)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            _free(self.ptr)

    class Context:
        pushed = 0

        def push(self) -> None:
            Context.pushed += 1

        def pop(self) -> None:
            Context.pushed -= 1

    class Stream:
        handle = 9

        def synchronize(self) -> None:
            pass

    def htod(dst, src, stream):
        DEVICE[dst][: src.nbytes] = src.view(np.uint8)
        WRITTEN.add(dst)

    def dtoh(dst, src, stream):
        assert src in WRITTEN, "device-to-host copy of a buffer nothing wrote"
        dst.view(np.uint8)[:] = DEVICE[src][: dst.nbytes]

    drv.init = lambda: None
    drv.Device = lambda i: types.SimpleNamespace(retain_primary_context=Context)
    drv.Context = Context
    drv.mem_alloc = Alloc
    drv.pagelocked_empty = lambda n, dtype: np.zeros(n, dtype)
    drv.Stream = Stream
    drv.memcpy_htod_async = htod
    drv.memcpy_dtoh_async = dtoh
    drv.mem_get_info = lambda: (FAKE_GPU.total_memory - sum(a.nbytes for a in DEVICE.values()), FAKE_GPU.total_memory)
    return drv


# -- TensorRT -----------------------------------------------------------------------------


def _enum(**members):
    return types.SimpleNamespace(**members)


class ILogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    def __init__(self) -> None:
        pass

    def log(self, severity, msg) -> None:
        raise NotImplementedError  # pure virtual in TensorRT


class Logger(ILogger):
    """TensorRT's default logger: prints to stdout (pyCore.cpp ``DefaultLogger``: ``std::cout``)."""

    def __init__(self, min_severity=ILogger.WARNING) -> None:
        super().__init__()
        self.min_severity = min_severity

    def log(self, severity, msg) -> None:
        if severity <= self.min_severity:
            print(f"[TRT] {msg}")


def _use_logger(logger, who: str) -> None:
    assert isinstance(logger, ILogger), f"{who} needs a tensorrt.ILogger, got {type(logger).__name__}"
    if LOGGERS.first is None:
        LOGGERS.first = logger
    elif logger is not LOGGERS.first:
        msg = (f"The logger passed into {who} differs from one already provided for an existing builder, runtime, or "
               "refitter. TensorRT maintains only a single logger pointer at any given time, so the existing value "
               "will be used instead.")  # fmt: skip
        LOGGERS.conflicts.append(msg)
        _log(ILogger.WARNING, msg)


def _log(severity: int, msg: str) -> None:
    LOGGERS.messages.append((severity, msg))
    if LOGGERS.first is not None:
        LOGGERS.first.log(severity, msg)


def _named_dims(vi) -> list[str | int]:
    """Per axis: the fixed size, or the dimension's name ('' for an unnamed dynamic one)."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict = {}

    def set_shape(self, name, mn, opt, mx) -> None:
        if not len(mn) == len(opt) == len(mx) or not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise RuntimeError("Shape provided for opt is inconsistent with other shapes.")  # what the binding raises
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


MAGIC = b"FAKE-TIMING-CACHE\n"


class _Cache:
    def __init__(self, tactics: bytes) -> None:
        self.tactics = tactics

    def serialize(self) -> bytes:
        return MAGIC + self.tactics + b"t"  # every build adds a "tactic"


class _Config:
    def __init__(self) -> None:
        self.flags = {"TF32"}
        self.profiles: list[_Profile] = []
        self.cache: _Cache | None = None

    def set_memory_pool_limit(self, pool, size) -> None:
        assert size > 0

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def set_flag(self, flag) -> None:
        raise AssertionError("a strongly typed build must not set precision flags")

    def add_optimization_profile(self, p) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _Cache:
        data = bytes(data)
        cache = _Cache(data[len(MAGIC) :] if data.startswith(MAGIC) else b"")
        cache.foreign = bool(data) and not data.startswith(MAGIC)  # type: ignore[attr-defined]
        return cache

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        if getattr(cache, "foreign", False):  # another device or version, or damaged: refused, nothing set
            _log(ILogger.WARNING, "Timing cache is not compatible with this build (header mismatch); not set")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache | None:
        return self.cache


class _Tensor:
    def __init__(self, vi) -> None:
        self.name = vi.name
        self.shape = tuple(d if isinstance(d, int) else -1 for d in _named_dims(vi))


class _Network:
    def __init__(self, flags: int) -> None:
        assert flags & 1, "networks are created strongly typed"
        self.model: onnx.ModelProto | None = None
        self.data: bytes | None = None

    @property
    def num_inputs(self) -> int:
        return len(self.model.graph.input) if self.model is not None else 0

    def get_input(self, i: int) -> _Tensor:
        return _Tensor(self.model.graph.input[i])


class _ParserError:
    def __init__(self, node: int, desc: str) -> None:
        self._node, self._desc = node, desc

    def node(self) -> int:
        return self._node

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node {self._node}: {self._desc}"


class OnnxParser:
    """TensorRT's ONNX parser: its support matrix and importer rules, errors through ``get_error``."""

    def __init__(self, network, logger) -> None:
        _use_logger(logger, "OnnxParser")
        self.network = network
        self.errors: list[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]

    def clear_errors(self) -> None:
        self.errors.clear()

    def parse(self, data: bytes) -> bool:
        from ultrastyle.trt.check import check_model

        try:
            model = onnx.load_from_string(data)
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001 - the parser reports, never raises
            self.errors.append(_ParserError(-1, f"ModelImporter: {exc}"))
        else:
            named = onnx.ModelProto()
            named.CopyFrom(model)
            for i, n in enumerate(named.graph.node):
                n.name = n.name or f"{n.op_type}_{i}"  # (as the parser names nodes: findings map back to an index)
            index = {f"node {n.name} ({n.op_type})": i for i, n in enumerate(named.graph.node)}
            for f in check_model(named, "network", kind=None):  # TensorRT's rules only, not ultrastyle's contract
                if f.severity == "error":
                    self.errors.append(_ParserError(index.get(f.where.split(": ", 1)[-1], -1), f.message))
        for e in self.errors:
            _log(ILogger.ERROR, f"ModelImporter.cpp: {e}")
        if self.errors:
            return False
        self.network.model, self.network.data = model, bytes(data)
        return True


class Builder:
    builds = 0

    def __init__(self, logger) -> None:
        _use_logger(logger, "createInferBuilder")

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network, config) -> bytes | None:
        Builder.builds += 1
        problem = _profile_problem(network.model, config.profiles)
        if problem:
            _log(ILogger.ERROR, f"IBuilder::buildSerializedNetwork: Error Code 4: API Usage Error ({problem})")
            return None
        _log(ILogger.VERBOSE, f"building {network.model.graph.name} with tactics from the timing cache")
        (profile,) = config.profiles
        head = json.dumps({"profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()}, "tf32": "TF32" in config.flags})
        return head.encode() + b"\n" + network.data


def _profile_problem(model: onnx.ModelProto, profiles: list[_Profile]) -> str | None:
    """What TensorRT's builder refuses in the profiles: uncovered dynamic inputs, changed fixed dims, named dims apart."""
    dims = {vi.name: _named_dims(vi) for vi in model.graph.input}
    dynamic = [n for n, d in dims.items() if any(not isinstance(x, int) for x in d)]
    if dynamic and not profiles:
        return "Network has dynamic or shape inputs, but no optimization profile has been defined."
    for p in profiles:
        named: dict[str, tuple[str, tuple]] = {}
        for n in dynamic:
            if n not in p.shapes:
                return f"Optimization Profile does not define dimensions for dynamic input {n}"
        for n, (mn, opt, mx) in p.shapes.items():
            if n not in dims:
                return f"{n} is not an input of the network"
            if len(mn) != len(dims[n]):
                return f"{n}: profile rank {len(mn)} does not match the input's {len(dims[n])}"
            for axis, d in enumerate(dims[n]):
                rng = (mn[axis], opt[axis], mx[axis])
                if isinstance(d, int) and rng != (d, d, d):
                    return f"{n}: axis {axis} is fixed at {d}, the profile gives {rng}"
                if isinstance(d, str) and d:
                    seen = named.setdefault(d, (f"{n}[{axis}]", rng))
                    if seen[1] != rng:
                        return f"named dimension {d!r}: {seen[0]} has range {seen[1]}, {n}[{axis}] has {rng}"
    return None


_DTYPES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16", TensorProto.INT8: "INT8",
           TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL", TensorProto.UINT8: "UINT8"}  # fmt: skip
TF32_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}


def tf32_emulated(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the float32 inputs of every Conv / MatMul / Gemm rounded to TF32's 10 mantissa bits.

    TF32 keeps float32's exponent and 10 of its 23 mantissa bits; float16 has
    the same 10, so a float32 -> float16 -> float32 cast rounds like TF32 for
    every value in float16's normal range (activations and weights here).
    Products then accumulate in float32, as on the tensor cores.
    """
    m = onnx.shape_inference.infer_shapes(model)
    types_ = {i.name: i.data_type for i in m.graph.initializer}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        types_[vi.name] = vi.type.tensor_type.elem_type
    nodes, ids = [], itertools.count()
    for node in m.graph.node:
        if node.op_type in TF32_OPS:
            for i in (0, 1):
                src = node.input[i]
                if types_.get(src) == TensorProto.FLOAT:
                    k = next(ids)
                    half, back = f"{src}__tf32_half{k}", f"{src}__tf32_{k}"
                    nodes += [helper.make_node("Cast", [src], [half], to=TensorProto.FLOAT16),
                              helper.make_node("Cast", [half], [back], to=TensorProto.FLOAT)]  # fmt: skip
                    node.input[i] = back
        nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


class _Engine:
    """Common to every version's engine; the memory-size attribute is the version's (below)."""

    context_class: type = None  # type: ignore[assignment]

    def __init__(self, data: bytes) -> None:
        head, body = data.split(b"\n", 1)
        meta = json.loads(head)
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in meta["profile"].items()}
        self.tf32 = bool(meta["tf32"])
        self.model = onnx.load_from_string(body)
        run = tf32_emulated(self.model) if self.tf32 else self.model
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(run.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.model.graph.input]
        self.outputs = [o.name for o in self.model.graph.output]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.shape_cache: dict = {}
        self._vi = {v.name: v for v in list(self.model.graph.input) + list(self.model.graph.output)}

    def memory_for(self, shapes: dict[str, tuple]) -> int:
        """Activation bytes for these input shapes (a made-up model that grows with them, as TensorRT's does)."""
        return 1024 + sum(int(np.prod(s)) for s in shapes.values())

    def _profile_memory(self) -> int:
        return self.memory_for({n: self.profile[n][2] if n in self.profile else self.get_tensor_shape(n) for n in self.inputs})

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name: str):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return getattr(DataType, _DTYPES[self._vi[name].type.tensor_type.elem_type])

    def get_tensor_profile_shape(self, name: str, index: int):
        return self.profile[name]  # a KeyError for a static input, as TensorRT has no profile for one

    def get_tensor_shape(self, name: str):
        return _Tensor(self._vi[name]).shape

    def create_execution_context(self, strategy):
        assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        return self.context_class(self)


class _Context:
    """Common to every version's context; how activation memory is bound is the version's (below)."""

    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.runs = 0

    def set_input_shape(self, name, shape) -> bool:
        static = self.engine.get_tensor_shape(name)
        if all(d >= 0 for d in static):
            self.shapes[name] = tuple(shape)
            return tuple(shape) == static
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        if name not in self.engine._vi or ptr not in DEVICE or ptr % 256 or name == FAULTS.refuse_address:
            _log(ILogger.ERROR, f"IExecutionContext::setTensorAddress: Error Code 3: API Usage Error ({name}: address {ptr:#x})")
            return False
        self.addresses[name] = ptr
        return True

    def _output_shapes(self) -> dict[str, tuple]:
        m = onnx.ModelProto()
        m.CopyFrom(self.engine.model)
        for i in m.graph.input:
            for d, v in zip(i.type.tensor_type.shape.dim, self.shapes[i.name]):
                d.Clear()
                d.dim_value = v
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        shapes = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in m.graph.output}
        if all(all(d > 0 for d in s) for s in shapes.values()):
            return shapes
        # ONNX shape inference does not follow Resize's scales: run the graph once on zeros, as TensorRT's own inference would tell
        key = tuple(sorted(self.shapes.items()))
        if key not in self.engine.shape_cache:
            feed = {n: np.zeros(self.shapes[n], np.float32) for n in self.engine.inputs}
            outs = self.engine.session.run(self.engine.outputs, feed)
            self.engine.shape_cache[key] = {n: tuple(o.shape) for n, o in zip(self.engine.outputs, outs)}
        return self.engine.shape_cache[key]

    def get_tensor_shape(self, name):
        return self._output_shapes()[name]

    def update_device_memory_size_for_shapes(self) -> int:
        if FAULTS.memory_for_shapes_zero or set(self.shapes) != set(self.engine.inputs):
            return 0  # "Total amount of memory required on success, 0 if error occurred" (NvInferRuntime.h)
        return self.engine.memory_for(self.shapes)

    def execute_async_v3(self, stream) -> bool:
        need = self.engine.memory_for(self.shapes)
        if self.memory is None or self.memory[1] < need:
            _log(ILogger.ERROR, f"IExecutionContext::enqueueV3: activation memory {self.memory} for {need} bytes")
            return False
        feed = {}
        for name in self.engine.inputs:
            ptr = self.addresses.get(name)
            if ptr is None or name not in self.shapes:
                _log(ILogger.ERROR, f"IExecutionContext::enqueueV3: input {name} has no address or shape")
                return False
            assert ptr in WRITTEN, f"{name} read from device memory nothing wrote"
            n = int(np.prod(self.shapes[name]))
            feed[name] = DEVICE[ptr][: n * 4].view(np.float32).reshape(self.shapes[name])
        outs = self.engine.session.run(self.engine.outputs, feed)
        for name, arr in zip(self.engine.outputs, outs):
            ptr = self.addresses.get(name)
            if ptr is None:
                _log(ILogger.ERROR, f"IExecutionContext::enqueueV3: output {name} has no address")
                return False
            raw = np.ascontiguousarray(arr, np.float32).reshape(-1).view(np.uint8)
            assert DEVICE[ptr].nbytes >= raw.nbytes, f"{name}: output buffer too small"
            DEVICE[ptr][: raw.nbytes] = raw
            WRITTEN.add(ptr)
        self.runs += 1
        return True


class _Context101(_Context):
    """TensorRT 10.1+ (and 11): ``set_device_memory(memory, size)``."""

    def set_device_memory(self, ptr, size) -> None:
        assert ptr in DEVICE and DEVICE[ptr].nbytes >= size, "activation memory smaller than the size given"
        self.memory = (ptr, size)


class _Context100(_Context):
    """TensorRT 10.0: a write-only ``device_memory`` attribute; the size is what the allocation holds."""

    def _set_memory(self, ptr) -> None:
        assert ptr in DEVICE, "activation memory is not device memory"
        self.memory = (ptr, DEVICE[ptr].nbytes)

    device_memory = property(None, _set_memory)


class _Engine101(_Engine):
    context_class = _Context101

    @property
    def device_memory_size_v2(self) -> int:
        return self._profile_memory()


class _Engine100(_Engine):
    context_class = _Context100

    @property
    def device_memory_size(self) -> int:
        return self._profile_memory()


class Runtime:
    engine_class: type = _Engine101

    def __init__(self, logger) -> None:
        _use_logger(logger, "createInferRuntime")

    def deserialize_cuda_engine(self, data: bytes):
        try:
            if FAULTS.deserialize_none:
                raise ValueError("the plan was built by another TensorRT version")
            return self.engine_class(bytes(data))
        except Exception as exc:  # noqa: BLE001 - TensorRT logs and returns None
            _log(ILogger.ERROR, f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization ({exc})")
            return None


TensorIOMode = _enum(INPUT="in", OUTPUT="out")
DataType = _enum(FLOAT="float", HALF="half", BF16="bf16", INT8="int8", INT32="int32", INT64="int64", BOOL="bool", UINT8="uint8")
ExecutionContextAllocationStrategy = _enum(STATIC=0, USER_MANAGED=2)
NetworkDefinitionCreationFlag = _enum(STRONGLY_TYPED=0)
MemoryPoolType = _enum(WORKSPACE=0)
IBuilderConfig = _Config


def make_tensorrt(api: str = "10.1+") -> types.ModuleType:
    """The stand-in ``tensorrt`` module: ``"10.1+"`` (10.1 to 11) or ``"10.0"``."""
    mod = types.ModuleType("tensorrt")
    for name in ("ILogger", "Logger", "Builder", "OnnxParser", "TensorIOMode", "DataType", "ExecutionContextAllocationStrategy",
                 "NetworkDefinitionCreationFlag", "MemoryPoolType", "IBuilderConfig"):  # fmt: skip
        setattr(mod, name, globals()[name])
    if api == "10.0":
        mod.Runtime = type("Runtime", (Runtime,), {"engine_class": _Engine100})
        mod.IExecutionContext, mod.ICudaEngine = _Context100, _Engine100
        mod.BuilderFlag = _enum(TF32="TF32", FP16="FP16", INT8="INT8")  # still there in 10.0 (deprecated 10.12)
        mod.__version__ = "10.0.1"
    else:
        mod.Runtime, mod.IExecutionContext, mod.ICudaEngine = Runtime, _Context101, _Engine101
        mod.BuilderFlag = _enum(TF32="TF32")
        mod.__version__ = "10.99.0"
    return mod


fake_tensorrt = make_tensorrt()
fake_tensorrt_10_0 = make_tensorrt("10.0")


def install(monkeypatch, *, api: str = "10.1+", memory: str = "fake", **faults) -> types.ModuleType:
    """Route ultrastyle's TensorRT, GPU and device-memory lookups to the fakes.

    ``memory``: ``"fake"`` replaces `open_device_memory`; ``"cuda-python"`` and
    ``"pycuda"`` keep ultrastyle's own implementations over stand-in binding
    modules (the other binding made unimportable). ``faults``: `Faults` fields.
    """
    import ultrastyle.runtime.backends.tensorrt_backend as backend
    import ultrastyle.trt.build as build
    import ultrastyle.trt.device_memory as dm
    import ultrastyle.trt.env as env

    trt = fake_tensorrt_10_0 if api == "10.0" else fake_tensorrt
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "FAULTS", Faults(**faults))
    monkeypatch.setattr(this, "LOGGERS", _LoggerState())
    for mod in (env, build, backend):
        for name, value in (("import_tensorrt", lambda: trt), ("require_gpu", lambda: FAKE_GPU),
                            ("require_tensorrt_stack", lambda *a, **k: FAKE_GPU), ("probe_gpus", lambda: [FAKE_GPU]),
                            ("missing_for_tensorrt", lambda: [])):  # fmt: skip
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, value)
    if memory == "fake":
        monkeypatch.setattr(dm, "open_device_memory", lambda *a, **k: FakeMemory())
    else:
        install_cuda_bindings(monkeypatch, cuda_python=memory == "cuda-python", pycuda=memory == "pycuda")
        monkeypatch.setenv("ULTRASTYLE_CUDA_BINDING", memory)
    return trt


def install_cuda_bindings(monkeypatch, *, cuda_python: bool, pycuda: bool) -> None:
    """Stand-in ``cuda.bindings.runtime`` and ``pycuda.driver`` modules (None in sys.modules: not installed)."""
    rt = _cudart_module() if cuda_python else None
    drv = _pycuda_driver_module() if pycuda else None
    mods = {"cuda": types.ModuleType("cuda") if rt else None, "cuda.bindings": types.ModuleType("cuda.bindings") if rt else None,
            "cuda.bindings.runtime": rt, "cuda.cudart": None,
            "pycuda": types.ModuleType("pycuda") if drv else None, "pycuda.driver": drv}  # fmt: skip
    if rt:
        mods["cuda"].bindings = mods["cuda.bindings"]
        mods["cuda.bindings"].runtime = rt
    if drv:
        mods["pycuda"].driver = drv
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
