"""Device memory through one small interface: cuda-python (the default) or pycuda.

The TensorRT runner needs little from CUDA: device buffers (the engines'
activation memory and I/O tensors), pinned host buffers for tile transfer, a
stream, asynchronous copies, a synchronize, and the free/total memory. That is
`DeviceMemory`. Two implementations:

- `CudaPythonMemory`: NVIDIA's cuda-python, the binding TensorRT's current
  Python samples use (``samples/python/common_runtime.py``: ``cudaMalloc``,
  ``cudaMallocHost``, ``cudaMemcpyAsync``, ``cudaStreamCreate``,
  ``cudaStreamSynchronize``). It ships wheels. Since cuda-python 12.6 the
  runtime module is ``cuda.bindings.runtime``; 12.x before that had
  ``cuda.cudart`` (both are tried). Every call returns ``(error, *values)``.
- `PyCudaMemory`: pycuda for users who have it (source-only: it needs the CUDA
  headers to install). It retains the device's *primary* context
  (``Device.retain_primary_context().push()``), the context TensorRT's
  runtime-API calls use; ``pycuda.autoinit`` would create a second context
  whose pointers TensorRT could not use.

cuda-python's CUDA major must be one the driver supports (cuda-python 13 needs
an R580+ driver; on an older one ``cudaSetDevice`` fails with CUDA error 35)
and should match TensorRT's wheel (``tensorrt-cu12`` with cuda-python 12.x:
the ``tensorrt`` extra pins both). A cuda-python that cannot use the GPU
raises `CudaBindingUnusable`, so ``auto`` falls back to pycuda as it does
when cuda-python is missing.

Pointers are plain ints and streams are plain int handles, which is what
``IExecutionContext.set_tensor_address``, ``set_device_memory`` and
``execute_async_v3(stream_handle)`` take.
"""

from __future__ import annotations

import ctypes
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ultrastyle.trt.env import INSTALL_PYCUDA, INSTALL_TENSORRT, TensorRTUnavailable, package_version, tensorrt_cuda_major

CUDA_BINDING_ENV_NAME = "ULTRASTYLE_CUDA_BINDING"  # the runner's choice of binding (tensorrt_backend.CUDA_BINDING_ENV)

ALIGNMENT = 256  # TensorRT wants device memory aligned to 256 bytes; cudaMalloc's is larger


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int
    handle: object = None  # the binding's own object, kept alive (pycuda frees on collection)


@dataclass
class HostBuffer:
    """Page-locked host memory as a uint8 numpy array."""

    array: np.ndarray
    ptr: int
    handle: object = None

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def view(self, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.array[:n].view(dtype).reshape(shape)


class DeviceMemory(ABC):
    """What the TensorRT runner needs from CUDA."""

    name = "abstract"

    @abstractmethod
    def alloc(self, nbytes: int) -> DeviceBuffer: ...

    @abstractmethod
    def free(self, buf: DeviceBuffer) -> None: ...

    @abstractmethod
    def alloc_pinned(self, nbytes: int) -> HostBuffer: ...

    @abstractmethod
    def free_pinned(self, buf: HostBuffer) -> None: ...

    @abstractmethod
    def create_stream(self) -> int: ...

    @abstractmethod
    def destroy_stream(self, stream: int) -> None: ...

    @abstractmethod
    def copy_htod(self, dst: int, src: HostBuffer, nbytes: int, stream: int) -> None: ...

    @abstractmethod
    def copy_dtoh(self, dst: HostBuffer, src: int, nbytes: int, stream: int) -> None: ...

    @abstractmethod
    def synchronize(self, stream: int) -> None: ...

    @abstractmethod
    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current device."""

    def close(self) -> None:
        """Release what the implementation holds itself (contexts); buffers are freed by their owners."""


class CudaBindingUnusable(TensorRTUnavailable):
    """A CUDA binding that is installed but cannot use the GPU (a CUDA major the driver does not support)."""


def cuda_binding_advice() -> str:
    """What to install when cuda-python fails on this driver: the CUDA major of TensorRT's wheel."""
    cp = package_version("cuda-python") or package_version("cuda-bindings")
    trt_major = tensorrt_cuda_major()
    have = f"cuda-python {cp} is installed" if cp else "cuda-python"
    want = f"{trt_major}" if trt_major else "12"
    return (
        f"{have}; its CUDA major must match TensorRT's wheel (CUDA {want} here) and the driver must support it "
        f"(CUDA 13 needs an R580 or newer driver): pip install 'cuda-python>={want}.0,<{int(want) + 1}' "
        f"(or update the NVIDIA driver), or set {CUDA_BINDING_ENV_NAME}=pycuda"
    )


def _import_cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise TensorRTUnavailable(f"the cuda-python package is not installed; install it with: {INSTALL_TENSORRT}")


class CudaPythonMemory(DeviceMemory):
    """cuda-python's runtime API (``cuda.bindings.runtime``)."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        self.rt = _import_cudart()
        try:
            self._call(self.rt.cudaSetDevice(device), "cudaSetDevice")
        except RuntimeError as exc:  # e.g. CUDA error 35: cuda-python 13 on a driver older than R580
            raise CudaBindingUnusable(f"cuda-python cannot use the GPU ({exc}); {cuda_binding_advice()}") from exc

    def _call(self, result, what: str):
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            _, text = self.rt.cudaGetErrorString(err)
            msg = text.decode() if isinstance(text, bytes) else str(text)
            raise RuntimeError(f"{what} failed: CUDA error {int(err)} ({msg})")
        return values[0] if len(values) == 1 else values

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._call(self.rt.cudaMalloc(max(int(nbytes), ALIGNMENT)), f"cudaMalloc({nbytes})")
        return DeviceBuffer(int(ptr), int(nbytes))

    def free(self, buf: DeviceBuffer) -> None:
        self._call(self.rt.cudaFree(buf.ptr), "cudaFree")

    def alloc_pinned(self, nbytes: int) -> HostBuffer:
        n = max(int(nbytes), 1)
        ptr = int(self._call(self.rt.cudaMallocHost(n), f"cudaMallocHost({n})"))
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(ptr))
        return HostBuffer(arr, ptr)

    def free_pinned(self, buf: HostBuffer) -> None:
        self._call(self.rt.cudaFreeHost(buf.ptr), "cudaFreeHost")

    def create_stream(self) -> int:
        return int(self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate"))

    def destroy_stream(self, stream: int) -> None:
        self._call(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def copy_htod(self, dst: int, src: HostBuffer, nbytes: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ptr, nbytes, kind, stream), "cudaMemcpyAsync (host to device)")

    def copy_dtoh(self, dst: HostBuffer, src: int, nbytes: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ptr, src, nbytes, kind, stream), "cudaMemcpyAsync (device to host)")

    def synchronize(self, stream: int) -> None:
        self._call(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def mem_info(self) -> tuple[int, int]:
        free, total = self._call(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)


class PyCudaMemory(DeviceMemory):
    """pycuda's driver API on the device's primary context."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        try:
            self.cuda = importlib.import_module("pycuda.driver")
        except ImportError as exc:
            raise TensorRTUnavailable(f"pycuda is not installed ({exc}); install it with: {INSTALL_PYCUDA}, or set ULTRASTYLE_CUDA_BINDING=cuda-python") from exc
        self.cuda.init()
        self.context = self.cuda.Device(device).retain_primary_context()
        self.context.push()
        self._streams: dict[int, object] = {}

    def alloc(self, nbytes: int) -> DeviceBuffer:
        alloc = self.cuda.mem_alloc(max(int(nbytes), ALIGNMENT))
        return DeviceBuffer(int(alloc), int(nbytes), alloc)

    def free(self, buf: DeviceBuffer) -> None:
        buf.handle.free()  # type: ignore[union-attr]

    def alloc_pinned(self, nbytes: int) -> HostBuffer:
        arr = self.cuda.pagelocked_empty(max(int(nbytes), 1), np.uint8)
        return HostBuffer(arr, int(arr.ctypes.data), arr)

    def free_pinned(self, buf: HostBuffer) -> None:
        base = getattr(buf.handle, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()

    def create_stream(self) -> int:
        s = self.cuda.Stream()
        self._streams[int(s.handle)] = s
        return int(s.handle)

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)

    def copy_htod(self, dst: int, src: HostBuffer, nbytes: int, stream: int) -> None:
        self.cuda.memcpy_htod_async(dst, src.array[:nbytes], self._streams[stream])

    def copy_dtoh(self, dst: HostBuffer, src: int, nbytes: int, stream: int) -> None:
        self.cuda.memcpy_dtoh_async(dst.array[:nbytes], src, self._streams[stream])

    def synchronize(self, stream: int) -> None:
        self._streams[stream].synchronize()

    def mem_info(self) -> tuple[int, int]:
        free, total = self.cuda.mem_get_info()
        return int(free), int(total)

    def close(self) -> None:
        self._streams.clear()
        self.context.pop()


MEMORY_BACKENDS = ("auto", "cuda-python", "pycuda")


def open_device_memory(which: str = "auto", device: int = 0) -> DeviceMemory:
    """``cuda-python`` (default where installed), else ``pycuda``; ``which`` picks one explicitly."""
    if which not in MEMORY_BACKENDS:
        raise ValueError(f"unknown device-memory backend {which!r}; choose one of {', '.join(MEMORY_BACKENDS)}")
    if which == "cuda-python":
        return CudaPythonMemory(device)
    if which == "pycuda":
        return PyCudaMemory(device)
    try:
        return CudaPythonMemory(device)
    except TensorRTUnavailable as first:  # not installed, or installed for a CUDA the driver lacks
        try:
            return PyCudaMemory(device)
        except TensorRTUnavailable:
            raise type(first)(f"{first} (pycuda is not installed either)") from None


class GrowingBuffer:
    """A device buffer that is reallocated larger when a bigger tile comes, never smaller (sized by the plan)."""

    def __init__(self, memory: DeviceMemory, headroom: float = 1.0) -> None:
        self.memory, self.headroom = memory, headroom
        self.buf: DeviceBuffer | None = None

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes if self.buf else 0

    @property
    def ptr(self) -> int:
        assert self.buf is not None
        return self.buf.ptr

    def ensure(self, nbytes: int) -> bool:
        """Hold at least ``nbytes``; True when the buffer moved (callers re-bind its address)."""
        if self.buf is not None and self.buf.nbytes >= nbytes:
            return False
        if self.buf is not None:
            self.memory.free(self.buf)
        self.buf = self.memory.alloc(int(nbytes * self.headroom) + 1)
        return True

    def release(self) -> None:
        if self.buf is not None:
            self.memory.free(self.buf)
            self.buf = None


class GrowingPinned:
    """A pinned host buffer that grows like `GrowingBuffer`."""

    def __init__(self, memory: DeviceMemory) -> None:
        self.memory = memory
        self.buf: HostBuffer | None = None

    def ensure(self, nbytes: int) -> HostBuffer:
        if self.buf is None or self.buf.nbytes < nbytes:
            if self.buf is not None:
                self.memory.free_pinned(self.buf)
            self.buf = self.memory.alloc_pinned(nbytes)
        return self.buf

    def release(self) -> None:
        if self.buf is not None:
            self.memory.free_pinned(self.buf)
            self.buf = None
