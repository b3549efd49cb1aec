"""A stand-in for TensorRT and CUDA that runs the engines' ONNX graphs with ONNX Runtime (no tests here).

It exposes the API surface ultrastyle uses, with TensorRT 10/11 names
(``create_network``, ``OnnxParser``, ``build_serialized_network``,
``deserialize_cuda_engine``, ``create_execution_context(USER_MANAGED)``,
``set_input_shape``, ``set_tensor_address``, ``update_device_memory_size_for_shapes``,
``set_device_memory``, ``execute_async_v3``) and a device memory whose
"pointers" index host arrays. It checks what the real ones would refuse:
shapes outside the profile, unbound tensors, activation memory missing or too
small, reads of device memory that was never written. So the builder, the
engine folder logic and the runner's data flow (pinned buffers, features kept
"on the device" between engines, the statistics graph) run on a CPU; whether
TensorRT itself agrees is what the GPU tests check.
"""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import onnx
import onnxruntime as ort

from ultrastyle.trt.device_memory import DeviceBuffer, DeviceMemory, HostBuffer
from ultrastyle.trt.env import GpuInfo

FAKE_GPU = GpuInfo(0, "Fake GPU 9000", (9, 0), 80 * 2**30, "12.8", "570.0")
_ids = itertools.count(1 << 20, 1 << 12)
DEVICE: dict[int, np.ndarray] = {}
WRITTEN: set[int] = set()


class FakeMemory(DeviceMemory):
    name = "fake"

    def __init__(self, *_a) -> None:
        self.streams = 0

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = next(_ids)
        DEVICE[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        return DeviceBuffer(ptr, nbytes)

    def free(self, buf: DeviceBuffer) -> None:
        del DEVICE[buf.ptr]
        WRITTEN.discard(buf.ptr)

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


def _enum(**members):
    return types.SimpleNamespace(**members)


class Logger:
    WARNING, VERBOSE = 2, 4

    def __init__(self, severity=2) -> None:
        self.severity = severity


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict = {}

    def set_shape(self, name, mn, opt, mx) -> None:
        assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), (name, mn, opt, mx)
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"t"  # every build adds a "tactic"


class _Config:
    def __init__(self) -> None:
        self.flags = {"TF32"}
        self.profiles: list[_Profile] = []
        self.cache = None

    def set_memory_pool_limit(self, pool, size) -> None:
        assert size > 0

    def clear_flag(self, flag) -> None:
        self.flags.discard(flag)

    def set_flag(self, flag) -> None:
        raise AssertionError("a strongly typed build must not set precision flags")

    def add_optimization_profile(self, p) -> int:
        self.profiles.append(p)
        return 0

    def create_timing_cache(self, data: bytes) -> _Cache:
        return _Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _Cache:
        return self.cache


class _Tensor:
    def __init__(self, vi) -> None:
        self.name = vi.name
        self.shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)


class _Network:
    def __init__(self, flags: int) -> None:
        assert flags & 1, "networks are created strongly typed"
        self.onnx: bytes | None = None

    @property
    def num_inputs(self) -> int:
        return len(onnx.load_from_string(self.onnx).graph.input)

    def get_input(self, i: int) -> _Tensor:
        return _Tensor(onnx.load_from_string(self.onnx).graph.input[i])


class OnnxParser:
    num_errors = 0

    def __init__(self, network, logger) -> None:
        self.network = network

    def parse(self, data: bytes) -> bool:
        onnx.checker.check_model(onnx.load_from_string(data))
        self.network.onnx = data
        return True


class Builder:
    builds = 0

    def __init__(self, logger) -> None:
        pass

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network, config) -> bytes:
        Builder.builds += 1
        (profile,) = config.profiles
        head = json.dumps({"profile": {k: [list(s) for s in v] for k, v in profile.shapes.items()}, "tf32": "TF32" in config.flags})
        return head.encode() + b"\n" + network.onnx


class _Engine:
    def __init__(self, data: bytes) -> None:
        head, body = data.split(b"\n", 1)
        meta = json.loads(head)
        self.profile = {k: tuple(tuple(s) for s in v) for k, v in meta["profile"].items()}
        self.model = onnx.load_from_string(body)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(body, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.model.graph.input]
        self.outputs = [o.name for o in self.model.graph.output]
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.device_memory_size_v2 = 1 << 16
        self.shape_cache: dict = {}

    def get_tensor_name(self, i: int) -> str:
        return (self.inputs + self.outputs)[i]

    def get_tensor_mode(self, name: str):
        return TensorIOMode.INPUT if name in self.inputs else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        return DataType.FLOAT

    def get_tensor_profile_shape(self, name: str, index: int):
        return self.profile[name]  # a KeyError for a static input, as TensorRT has no profile for one

    def get_tensor_shape(self, name: str):
        vi = next(v for v in list(self.model.graph.input) + list(self.model.graph.output) if v.name == name)
        return _Tensor(vi).shape

    def create_execution_context(self, strategy):
        assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        return _Context(self)


class _Context:
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
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> bool:
        assert ptr in DEVICE, f"{name}: address {ptr} is not device memory"
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
        return 1024 + sum(int(np.prod(s)) for s in self.shapes.values())

    def set_device_memory(self, ptr, size) -> None:
        assert ptr in DEVICE and DEVICE[ptr].nbytes >= size
        self.memory = (ptr, size)

    def execute_async_v3(self, stream) -> bool:
        assert self.memory is not None and self.memory[1] >= self.update_device_memory_size_for_shapes(), "activation memory"
        feed = {}
        for name in self.engine.inputs:
            ptr = self.addresses[name]
            assert ptr in WRITTEN, f"{name} read from device memory nothing wrote"
            n = int(np.prod(self.shapes[name]))
            feed[name] = DEVICE[ptr][: n * 4].view(np.float32).reshape(self.shapes[name])
        outs = self.engine.session.run(self.engine.outputs, feed)
        for name, arr in zip(self.engine.outputs, outs):
            ptr = self.addresses[name]
            raw = np.ascontiguousarray(arr, np.float32).reshape(-1).view(np.uint8)
            assert DEVICE[ptr].nbytes >= raw.nbytes, f"{name}: output buffer too small"
            DEVICE[ptr][: raw.nbytes] = raw
            WRITTEN.add(ptr)
        self.runs += 1
        return True


class Runtime:
    def __init__(self, logger) -> None:
        pass

    def deserialize_cuda_engine(self, data: bytes) -> _Engine:
        return _Engine(data)


TensorIOMode = _enum(INPUT="in", OUTPUT="out")
DataType = _enum(FLOAT="float")
ExecutionContextAllocationStrategy = _enum(STATIC=0, USER_MANAGED=2)
NetworkDefinitionCreationFlag = _enum(STRONGLY_TYPED=0)
BuilderFlag = _enum(TF32="TF32")
MemoryPoolType = _enum(WORKSPACE=0)
IExecutionContext = _Context
ICudaEngine = _Engine
IBuilderConfig = _Config
__version__ = "10.99.0"

fake_tensorrt = types.ModuleType("tensorrt")
for _name in ("Logger", "Builder", "OnnxParser", "Runtime", "TensorIOMode", "DataType", "ExecutionContextAllocationStrategy",
              "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "IExecutionContext", "ICudaEngine",
              "IBuilderConfig", "__version__"):  # fmt: skip
    setattr(fake_tensorrt, _name, globals()[_name])


def install(monkeypatch) -> types.ModuleType:
    """Route ultrastyle's TensorRT, GPU and device-memory lookups to the fakes."""
    import ultrastyle.runtime.backends.tensorrt_backend as backend
    import ultrastyle.trt.build as build
    import ultrastyle.trt.device_memory as dm
    import ultrastyle.trt.env as env

    for mod in (env, build, backend):
        for name, value in (("import_tensorrt", lambda: fake_tensorrt), ("require_gpu", lambda: FAKE_GPU),
                            ("require_tensorrt_stack", lambda *a, **k: FAKE_GPU), ("probe_gpus", lambda: [FAKE_GPU]),
                            ("missing_for_tensorrt", lambda: [])):  # fmt: skip
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, value)
    monkeypatch.setattr(dm, "open_device_memory", lambda *a, **k: FakeMemory())
    return fake_tensorrt
