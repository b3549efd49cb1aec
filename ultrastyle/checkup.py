"""What is installed and usable here, with the fix for what is missing: `ultrastyle doctor`'s checks, from Python.

    import ultrastyle
    checks = ultrastyle.doctor()
    if not ultrastyle.ready(checks):
        print("\\n".join(str(c) for c in checks if c.blocking and c.status == "unusable"))

Every probe is caught: `doctor` never raises for what it finds. A CPU-only machine is a healthy setup; what keeps
the CPU path from running (a damaged model, a backend that fails to open) is ``unusable`` and ``blocking``.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ultrastyle.errors import Remedies, Setting

Status = Literal["ok", "missing", "unusable", "info"]


@dataclass(frozen=True)
class Check:
    """One component's state. ``detail`` says what was found and, for what is missing, the fix: a pip command, or a
    Python call kept as data in ``remedy`` (the command line shows it as its command). ``blocking``: part of the CPU
    path (the model and its backends), whose ``unusable`` makes the setup not ready."""

    what: str
    status: Status
    detail: str
    remedy: Remedies = None
    blocking: bool = False

    def __str__(self) -> str:
        return f"{self.what}: {self.status}: {self.detail}"


def doctor(model: str | None = None, *, baseline: bool = False) -> list[Check]:
    """ultrastyle, Python, the memory setup, PyTorch, ONNX Runtime, libvips, Ray, the GPUs and driver, TensorRT, cuda-python, pycuda,
    and ``model`` (default: the default model; every file's sha256 checked).

    ``baseline``: also measure the memory baseline of each CPU backend with ``model`` open, where the model is
    installed and sound: what a run's ``max_memory`` comes on top of (a child process each, 10-40 s; the first time,
    the model's ONNX bundle is exported into the cache).
    """
    checks = environment_checks()
    found = model_checks(model)
    if baseline and found[0].status == "ok":
        found += baseline_checks(model)
    return checks + found


def ready(checks: list[Check]) -> bool:
    """Whether the CPU path can run: no ``blocking`` check ``unusable`` (TensorRT missing on a CPU machine is fine)."""
    return not any(c.blocking and c.status == "unusable" for c in checks)


def model_checks(model: str | None = None) -> list[Check]:
    """``model``'s files, hashed: absent is a note (installed on first use), damaged or half installed is unusable."""
    from ultrastyle.models import zoo
    from ultrastyle.models.pretrained import DEFAULT_MODEL
    from ultrastyle.options import unwritable_folder

    model = model or DEFAULT_MODEL
    what = f"model {model}"
    try:
        status = zoo.install_status(model)
    except zoo.ZooError as exc:  # an unknown name, a relative ULTRASTYLE_HOME
        return [Check(what, "unusable", " ".join(str(exc).split()), getattr(exc, "remedy", None), blocking=True)]
    if status == "absent" and (why := unwritable_folder(zoo.model_dir(model))):  # "fetched on first use" would fail then
        return [Check(what, "unusable", f"not installed, and {why}; set ULTRASTYLE_HOME to a folder you can write", blocking=True)]
    if status == "absent":
        return [Check(what, "missing", f"not installed (fetched on first use); install it now: {zoo.reinstall_text(model)}",
                      zoo.reinstall(model), blocking=True)]  # fmt: skip
    if status == "outdated":
        return [Check(what, "info", f"an earlier release's files, replaced on first use (or now: {zoo.reinstall_text(model)})",
                      zoo.reinstall(model), blocking=True)]  # fmt: skip
    try:
        d = zoo.check_installed(model)
    except zoo.DamagedModelError as exc:
        return [Check(what, "unusable", " ".join(str(exc).split()), getattr(exc, "remedy", None), blocking=True)]
    return [Check(what, "ok", f"{d} (sha256 verified)", blocking=True)]


def baseline_checks(model: str | None = None) -> list[Check]:
    """The memory baseline per CPU backend (`runtime.memory.measure_baseline`): what ``max_memory`` comes on top of.

    Measured with an installed, verified ``model`` only (`model_checks` reports the others).
    """
    from ultrastyle.models.pretrained import DEFAULT_MODEL
    from ultrastyle.models.registry import get_entry, is_zoo_name
    from ultrastyle.models.sources import LOADABLE_FORMATS
    from ultrastyle.runtime.backends.select import cache_repair_loss
    from ultrastyle.runtime.memory import measure_baseline

    model = model or DEFAULT_MODEL
    if is_zoo_name(model) and (kind := get_entry(model).format) not in LOADABLE_FORMATS:
        return [Check("baseline", "info", f"not measured: {model} is a {kind} model, a start for training, not one that stylizes")]
    checks = []
    for backend in ("onnxruntime", "torch"):
        what = f"baseline ({backend})"
        try:
            if backend == "onnxruntime" and (loss := cache_repair_loss(model)) is not None:  # a diagnosis: not a repair that deletes work
                checks.append(Check(what, "missing", f"not measured: {loss} (calibrate and build again after)", blocking=True))
                continue
            rss = measure_baseline(model, backend)
            checks.append(Check(what, "info", f"{rss / 2**20:.0f} MiB resident with {model} open: a run's peak is this plus at most "
                                f"its memory budget {Setting('max_memory').python()}", Setting("max_memory"), blocking=True))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks.append(Check(what, "unusable", " ".join(str(exc).split()), getattr(exc, "remedy", None), blocking=True))
    return checks


def environment_checks() -> list[Check]:
    """Every probe of the machine and its packages; none raises."""
    from ultrastyle._version import __version__
    from ultrastyle.runtime.memory import describe_memory_setup
    from ultrastyle.trt.env import (
        INSTALL_CUDA_PYTHON,
        INSTALL_ORT_GPU,
        INSTALL_PYCUDA,
        INSTALL_TENSORRT,
        detect_features,
        has_cuda_python,
        has_pycuda,
        has_tensorrt,
        import_tensorrt,
        package_version,
        probe_gpus,
        tensorrt_status,
    )

    gpus = probe_gpus()
    here = Path(__file__).resolve().parent
    checks = [Check("ultrastyle", "ok", f"{__version__} ({here})"),
              Check("python", "ok", f"{platform.python_version()} ({sys.executable})")]  # fmt: skip
    checks.append(Check("memory", "info", describe_memory_setup()))
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "CPU build or no GPU"
        checks.append(Check("torch", "ok", f"{torch.__version__}; {cuda}"))
    except ImportError as exc:  # pragma: no cover - a base dependency
        checks.append(Check("torch", "missing", f"{exc}: pip install torch"))
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        gpu = "CUDAExecutionProvider" in providers
        checks.append(Check("onnxruntime", "ok", f"{ort.__version__}; providers {', '.join(providers)}"
                            + (f"; for its CUDA provider: {INSTALL_ORT_GPU}" if not gpu and gpus else "")))  # fmt: skip
    except ImportError as exc:  # pragma: no cover - a base dependency
        checks.append(Check("onnxruntime", "missing", f"{exc}: pip install onnxruntime"))

    from ultrastyle.io.stream import vips_missing

    if (why := vips_missing()) is None:
        import pyvips

        checks.append(Check("libvips", "ok", f"pyvips {pyvips.__version__}, libvips {pyvips.version(0)}.{pyvips.version(1)}."
                            f"{pyvips.version(2)}: large contents are read a band at a time"))  # fmt: skip
    else:
        checks.append(Check("libvips", "missing", f"{why}: contents are read whole; to stream large ones: pip install 'ultrastyle[vips]'"))

    checks.append(_ray_check(package_version))

    if gpus:
        for g in gpus:
            checks.append(Check(f"gpu {g.index}", "ok", f"{g.name}, compute capability {g.compute_capability[0]}."
                                f"{g.compute_capability[1]}, {g.total_memory / 2**30:.1f} GiB"))  # fmt: skip
        g = gpus[0]
        checks.append(Check("driver", "ok", f"NVIDIA {g.nvidia_driver or '?'}, supports CUDA {g.cuda_driver}"))
    else:
        checks.append(Check("gpu", "missing", "no NVIDIA GPU or driver visible (libcuda.so.1): the CPU backends run; TensorRT needs a GPU"))

    trt_version, _ = tensorrt_status()
    if not has_tensorrt():
        checks.append(Check("tensorrt", "missing", INSTALL_TENSORRT))
    else:
        try:
            trt = import_tensorrt()
            f = detect_features(trt)
            api = "strongly typed" + (", weak-typing flags" if f.weak_typing_flags else "") + (
                ", device_memory_size_v2" if f.device_memory_v2 else ", device_memory_size")
            checks.append(Check("tensorrt", "ok" if gpus else "unusable",
                                f"{f.version} ({api})" + ("" if gpus else "; no GPU here: Builder and Runtime would fail (CUDA error 35)")))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
            checks.append(Check("tensorrt", "unusable", f"{trt_version or '?'}: {exc}"))
    cp = package_version("cuda-python") or package_version("cuda-bindings")
    has_cp = has_cuda_python()
    checks.append(Check("cuda-python", "ok" if has_cp else "missing", cp if has_cp else f"{INSTALL_TENSORRT} (or {INSTALL_CUDA_PYTHON})"))
    has_pc = has_pycuda()
    checks.append(Check("pycuda", "ok" if has_pc else "missing", (package_version("pycuda") or "?") if has_pc else f"optional; {INSTALL_PYCUDA}"))
    return checks


def _ray_check(package_version: Callable[[str], str | None]) -> Check:
    """Ray and zarr from their installed metadata (importing Ray takes seconds)."""
    from ultrastyle.distributed.zarr_canvas import zarr_lacking

    ray, zarr = package_version("ray"), package_version("zarr")
    if ray is None:
        return Check("ray", "missing", "batches run on this machine; to spread them over a cluster: pip install 'ultrastyle[ray]'")
    if (found := zarr_lacking(zarr)) is not None:
        return Check("ray", "ok", f"ray {ray}: batches over a cluster; spreading one image's tiles (distribute_tiles) needs zarr 3, "
                                  f"but {found}: pip install 'ultrastyle[ray]' (Python 3.11 or newer)")  # fmt: skip
    return Check("ray", "ok", f"ray {ray}, zarr {zarr}: batches, and one image's tiles, over a cluster")


__all__ = ["Check", "Status", "baseline_checks", "doctor", "environment_checks", "model_checks", "ready"]
