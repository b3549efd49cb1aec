"""What is installed and usable for the GPU path, probed without failing on a CPU machine.

- The GPU and driver come from the CUDA driver library (``libcuda.so.1``)
  through ctypes: ``cuInit``, ``cuDeviceGetCount``, ``cuDeviceGetName``,
  ``cuDeviceGetAttribute`` (compute capability: attributes 75 and 76),
  ``cuDeviceTotalMem_v2``, ``cuDriverGetVersion`` (CUDA driver API reference,
  docs.nvidia.com/cuda/cuda-driver-api). No Python package is needed for it,
  so ``doctor`` and ``--backend auto`` can ask on any machine.
- ``import tensorrt`` works without a driver, but creating a ``Builder`` or
  ``Runtime`` then fails with CUDA error 35 (insufficient driver): the GPU is
  probed first, and TensorRT objects are only made when one is there.
- TensorRT 10 and 11 differ in API surface; `TrtFeatures` detects each
  difference by the attribute, never by the version string (TensorRT 11
  migration guide, "Removed Python APIs and Replacements").
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ultrastyle.errors import RunnerError

INSTALL_TENSORRT = "pip install 'ultrastyle[tensorrt]'"  # the tensorrt and cuda-python wheels
INSTALL_CUDA_PYTHON = "pip install 'cuda-python>=12.6,<13'"  # as the tensorrt extra pins it: 13.x needs an R580+ driver
INSTALL_PYCUDA = "pip install pycuda (it builds from source and needs the CUDA toolkit headers)"
# onnxruntime-gpu replaces the CPU wheel (one import package); an extra of ultrastyle would reinstall the CPU one beside it.
INSTALL_ORT_GPU = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"

_CC_MAJOR, _CC_MINOR = 75, 76  # CUdevice_attribute: COMPUTE_CAPABILITY_MAJOR / _MINOR


class TensorRTUnavailable(RunnerError):
    """TensorRT, a CUDA binding or a GPU is missing; the message says which and how to install it."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    cuda_driver: str  # the CUDA version the driver supports, e.g. "12.4"
    nvidia_driver: str | None  # the kernel driver's version, e.g. "550.54.15"

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"


def libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library (Linux libcuda.so.1, Windows nvcuda.dll), None without one."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        try:
            return ctypes.CDLL("nvcuda.dll")  # Windows
        except (OSError, AttributeError):
            return None


def probe_gpus() -> list[GpuInfo]:
    """Every CUDA device the driver shows; empty without a driver or a device (never raises)."""
    cuda = libcuda()
    if cuda is None:
        return []
    try:
        if cuda.cuInit(0) != 0:
            return []
        count = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        version = ctypes.c_int(0)
        cuda.cuDriverGetVersion(ctypes.byref(version))
        cuda_driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
        gpus = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
                continue
            name = ctypes.create_string_buffer(256)
            cuda.cuDeviceGetName(name, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev)
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev)
            total = ctypes.c_size_t(0)
            cuda.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
            gpus.append(
                GpuInfo(i, name.value.decode(errors="replace"), (major.value, minor.value), total.value, cuda_driver, nvidia_driver_version())
            )
        return gpus
    except (OSError, AttributeError):  # a stub libcuda without these symbols
        return []


def nvidia_driver_version() -> str | None:
    """The kernel driver's version from /proc (Linux), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    m = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_tensorrt() -> ModuleType:
    """``tensorrt``, or TensorRTUnavailable with the install command."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(f"the tensorrt Python package is not installed ({exc}); install it with: {INSTALL_TENSORRT}") from exc
    except OSError as exc:  # the bindings are there, libnvinfer is not
        raise TensorRTUnavailable(
            f"the tensorrt package is installed but its libraries do not load ({exc}); reinstall with: {INSTALL_TENSORRT}"
        ) from exc


def require_gpu() -> GpuInfo:
    """The first GPU, or TensorRTUnavailable saying that none is visible (and why it matters)."""
    gpus = probe_gpus()
    if not gpus:
        raise TensorRTUnavailable(
            "TensorRT needs an NVIDIA GPU and its driver, and none is visible here (libcuda.so.1 missing or no device); "
            "use the onnxruntime backend (CPU) instead"
        )
    return gpus[0]


@dataclass(frozen=True)
class TrtFeatures:
    """The TensorRT 10 / 11 differences this package uses, detected by attribute."""

    version: str
    strongly_typed_flag: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x; accepted but ignored in 11)
    weak_typing_flags: bool  # BuilderFlag.FP16 / INT8 exist (deprecated 10.12, removed in 11)
    int8_calibrator: bool  # IBuilderConfig.int8_calibrator (deprecated 10.1, removed in 11)
    device_memory_v2: bool  # ICudaEngine.device_memory_size_v2 (10.1+; the only one in 11)
    sized_set_device_memory: bool  # IExecutionContext.set_device_memory(memory, size) (10.1+)
    memory_for_shapes: bool  # IExecutionContext.update_device_memory_size_for_shapes() (10.x)
    tf32_flag: bool  # BuilderFlag.TF32 (on by default in every version)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def detect_features(trt: ModuleType) -> TrtFeatures:
    flags = getattr(trt, "BuilderFlag", None)
    return TrtFeatures(
        version=str(getattr(trt, "__version__", "unknown")),
        strongly_typed_flag=hasattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED"),
        weak_typing_flags=hasattr(flags, "FP16") and hasattr(flags, "INT8"),
        int8_calibrator=hasattr(getattr(trt, "IBuilderConfig", None), "int8_calibrator"),
        device_memory_v2=hasattr(getattr(trt, "ICudaEngine", None), "device_memory_size_v2"),
        sized_set_device_memory=hasattr(getattr(trt, "IExecutionContext", None), "set_device_memory"),
        memory_for_shapes=hasattr(getattr(trt, "IExecutionContext", None), "update_device_memory_size_for_shapes"),
        tf32_flag=hasattr(flags, "TF32"),
    )


class _LoggerSlot:
    """The process's one TensorRT logger, per TensorRT module (the real one, or a test's stand-in)."""

    module: ModuleType | None = None
    logger: object = None


def tensorrt_logger(trt: ModuleType, *, verbose: bool = False) -> Any:
    """The one TensorRT logger of this process, writing to stderr; ``verbose`` sets its level for what follows.

    TensorRT keeps a single logger pointer per process: a ``Builder`` or
    ``Runtime`` made with another logger while one exists keeps the first and
    warns (NVIDIA/TensorRT#1475), so a level asked for a later build would be
    ignored. Its default ``trt.Logger`` also prints to stdout (pyCore.cpp's
    ``DefaultLogger``: ``std::cout``), where ``stylize`` writes results. So,
    like Polygraphy's ``get_trt_logger``, one subclass of ``trt.ILogger``
    (``log(severity, msg)``, which must not raise) is made on first use and
    reused by the builder, the parser and the runner's runtime.
    """
    slot = _LoggerSlot
    if slot.module is not trt or slot.logger is None:
        slot.module, slot.logger = trt, _make_logger(trt)
    slot.logger.min_severity = int(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)  # type: ignore[attr-defined]
    return slot.logger


def _make_logger(trt: ModuleType):
    import sys

    names = {int(trt.Logger.INTERNAL_ERROR): "F", int(trt.Logger.ERROR): "E", int(trt.Logger.WARNING): "W",
             int(trt.Logger.INFO): "I", int(trt.Logger.VERBOSE): "V"}  # fmt: skip

    class StderrLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.min_severity = int(trt.Logger.WARNING)

        def log(self, severity, msg) -> None:  # called by TensorRT (noexcept): never raise
            try:
                if int(severity) <= self.min_severity:  # INTERNAL_ERROR is 0, VERBOSE the largest
                    print(f"[TensorRT] [{names.get(int(severity), '?')}] {msg}", file=sys.stderr, flush=True)
            except Exception:  # noqa: BLE001 - a closed stderr must not take TensorRT down
                pass

    return StderrLogger()


def engine_device_memory(engine: Any) -> int:
    """Activation bytes an execution context needs for the engine's whole profile (10.x and 11)."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:  # TensorRT 10.0
        size = engine.device_memory_size
    return int(size)


def tensorrt_status() -> tuple[str | None, str | None]:
    """(version, problem): the installed TensorRT's version without importing it, and why it cannot be used."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu12-bindings"):
        v = package_version(dist)
        if v:
            return v, None
    return None, f"not installed: {INSTALL_TENSORRT}"


def tensorrt_cuda_major() -> int | None:
    """The CUDA major TensorRT's installed wheel is built for (``tensorrt-cu12`` -> 12), or None if unknown."""
    for major in (13, 12, 11):
        if package_version(f"tensorrt-cu{major}") or package_version(f"tensorrt-cu{major}-libs"):
            return major
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def has_tensorrt() -> bool:
    """The tensorrt package is installed (not imported: importing it needs its CUDA libraries)."""
    return _has_module("tensorrt")


def has_cuda_python() -> bool:
    """cuda-python: ``cuda.bindings``, or ``cuda.cudart`` before 12.6."""
    return _has_module("cuda.bindings") or _has_module("cuda.cudart")


def has_pycuda() -> bool:
    return _has_module("pycuda")


def has_cuda_binding() -> bool:
    """A binding the TensorRT runner can allocate device memory with: cuda-python or pycuda."""
    return has_cuda_python() or has_pycuda()


def missing_for_tensorrt() -> list[str]:
    """What the TensorRT backend lacks here, each with how to get it (empty: all present)."""
    missing = []
    if not has_tensorrt():
        missing.append(f"the tensorrt package ({INSTALL_TENSORRT}, which brings cuda-python too)")
    if not has_cuda_binding():
        missing.append(f"a CUDA binding for device memory: cuda-python ({INSTALL_CUDA_PYTHON}) or pycuda")
    if not probe_gpus():
        missing.append("an NVIDIA GPU with its driver (none is visible: libcuda.so.1 missing or no device)")
    return missing


def require_tensorrt_stack(what: str = "the TensorRT backend", instead: str = "use the onnxruntime backend to run on the CPU") -> GpuInfo:
    """The GPU when TensorRT, a CUDA binding and a GPU are all here; else one TensorRTUnavailable naming all that is missing."""
    missing = missing_for_tensorrt()
    if missing:
        raise TensorRTUnavailable(f"{what} needs " + "; ".join(missing) + f"; {instead}")
    return probe_gpus()[0]
