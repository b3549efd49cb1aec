"""`ultrastyle doctor`: what is installed and usable here, with the install command for what is missing."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ultrastyle.cli.remedies import as_command, swap


@dataclass
class Row:
    what: str
    status: str  # "ok" | "missing" | "unusable" | "info"
    detail: str


def model_rows(model: str | None = None) -> list[Row]:
    """The default model's files, hashed: absent is a note (installed on first use), damaged or half installed is unusable."""
    from ultrastyle.models import zoo
    from ultrastyle.models.pretrained import DEFAULT_MODEL
    from ultrastyle.options import unwritable_folder

    model = model or DEFAULT_MODEL
    try:
        status = zoo.install_status(model)
    except zoo.ZooError as exc:  # a relative ULTRASTYLE_HOME
        return [Row(f"model {model}", "unusable", " ".join(as_command(exc).split()))]
    if status == "absent" and (why := unwritable_folder(zoo.model_dir(model))):  # "fetched on first use" would fail then
        return [Row(f"model {model}", "unusable", f"not installed, and {why}; set ULTRASTYLE_HOME to a folder you can write")]
    if status == "absent":
        return [Row(f"model {model}", "missing", "not installed (fetched on first use); install it now: "
                    f"{swap(zoo.reinstall_text(model), zoo.reinstall(model))}")]  # fmt: skip
    if status == "outdated":
        return [Row(f"model {model}", "info", "an earlier release's files, replaced on first use (or now: "
                    f"{swap(zoo.reinstall_text(model), zoo.reinstall(model))})")]  # fmt: skip
    try:
        d = zoo.check_installed(model)
    except zoo.DamagedModelError as exc:  # one row, the fix as the command, not one Python call per backend
        return [Row(f"model {model}", "unusable", " ".join(as_command(exc).split()))]
    return [Row(f"model {model}", "ok", f"{d} (sha256 verified)")]


def baseline_rows(model: str | None = None) -> list[Row]:
    """The memory baseline per CPU backend (`runtime.memory.measure_baseline`): what --max-memory comes on top of.

    Measured with an installed, verified ``model`` only (:func:`model_rows` reports the others).
    """
    from ultrastyle.models.pretrained import DEFAULT_MODEL
    from ultrastyle.runtime.backends.select import cache_repair_loss
    from ultrastyle.runtime.memory import measure_baseline

    model = model or DEFAULT_MODEL
    rows = []
    for backend in ("onnxruntime", "torch"):
        try:
            if backend == "onnxruntime" and (loss := cache_repair_loss(model)) is not None:  # a diagnosis: not a repair that deletes work
                rows.append(Row(f"baseline ({backend})", "missing", f"not measured: {loss} (calibrate and build again after)"))
                continue
            rss = measure_baseline(model, backend)
            rows.append(Row(f"baseline ({backend})", "info", f"{rss / 2**20:.0f} MiB resident with {model} open: "
                            "a run's peak is this plus at most --max-memory"))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            rows.append(Row(f"baseline ({backend})", "unusable", " ".join(as_command(exc).split())))
    return rows


def gather() -> list[Row]:
    """Every probe; none raises (a CPU-only machine is a healthy setup)."""
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
    rows = [Row("python", "ok", f"{platform.python_version()} ({sys.executable})")]
    rows.append(Row("memory", "info", describe_memory_setup()))
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "CPU build or no GPU"
        rows.append(Row("torch", "ok", f"{torch.__version__}; {cuda}"))
    except ImportError as exc:  # pragma: no cover - a base dependency
        rows.append(Row("torch", "missing", f"{exc}: pip install torch"))
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
        gpu = "CUDAExecutionProvider" in providers
        rows.append(Row("onnxruntime", "ok", f"{ort.__version__}; providers {', '.join(providers)}"
                        + (f"; for its CUDA provider: {INSTALL_ORT_GPU}" if not gpu and gpus else "")))  # fmt: skip
    except ImportError as exc:  # pragma: no cover - a base dependency
        rows.append(Row("onnxruntime", "missing", f"{exc}: pip install onnxruntime"))

    from ultrastyle.io.stream import vips_available

    if vips_available():
        import pyvips

        rows.append(Row("libvips", "ok", f"pyvips {pyvips.__version__}, libvips {pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}: "
                        "large contents are read a band at a time"))  # fmt: skip
    else:
        rows.append(Row("libvips", "missing", "contents are read whole; to stream large ones: pip install 'ultrastyle[vips]'"))

    if gpus:
        for g in gpus:
            rows.append(Row(f"gpu {g.index}", "ok", f"{g.name}, compute capability {g.compute_capability[0]}.{g.compute_capability[1]}, "
                                                     f"{g.total_memory / 2**30:.1f} GiB"))  # fmt: skip
        g = gpus[0]
        rows.append(Row("driver", "ok", f"NVIDIA {g.nvidia_driver or '?'}, supports CUDA {g.cuda_driver}"))
    else:
        rows.append(Row("gpu", "missing", "no NVIDIA GPU or driver visible (libcuda.so.1): the CPU backends run; TensorRT needs a GPU"))

    trt_version, _ = tensorrt_status()
    if not has_tensorrt():
        rows.append(Row("tensorrt", "missing", INSTALL_TENSORRT))
    else:
        try:
            trt = import_tensorrt()
            f = detect_features(trt)
            api = "strongly typed" + (", weak-typing flags" if f.weak_typing_flags else "") + (
                ", device_memory_size_v2" if f.device_memory_v2 else ", device_memory_size")
            rows.append(Row("tensorrt", "ok" if gpus else "unusable",
                            f"{f.version} ({api})" + ("" if gpus else "; no GPU here: Builder and Runtime would fail (CUDA error 35)")))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not raised
            rows.append(Row("tensorrt", "unusable", f"{trt_version or '?'}: {exc}"))
    cp = package_version("cuda-python") or package_version("cuda-bindings")
    has_cp = has_cuda_python()
    rows.append(Row("cuda-python", "ok" if has_cp else "missing", cp if has_cp else f"{INSTALL_TENSORRT} (or {INSTALL_CUDA_PYTHON})"))
    has_pc = has_pycuda()
    rows.append(Row("pycuda", "ok" if has_pc else "missing", (package_version("pycuda") or "?") if has_pc else f"optional; {INSTALL_PYCUDA}"))
    return rows


def doctor_command(
    baseline: bool = typer.Option(True, help="Measure the memory baseline of each CPU backend: a child process each, 10-40 s "
                                  "(the first time, the model's ONNX bundle is exported into the cache)."),
) -> None:
    """Report Python, the memory setup, PyTorch, ONNX Runtime, TensorRT, cuda-python, pycuda, the GPU and driver,
    and the memory baseline of each CPU backend with the default model.

    Exit status 0 on a healthy setup, CPU-only included; what is missing comes
    with the command that installs it. 1 where something present is unusable
    (a damaged model, a backend that fails to open).
    """
    from ultrastyle.trt.env import missing_for_tensorrt

    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column("component")
    table.add_column("status")
    table.add_column("details", overflow="fold")  # a long path folds onto the next line, not cut with an ellipsis
    measured = model_rows()
    if baseline and measured[0].status == "ok":
        measured += baseline_rows()
    for r in gather() + measured:
        style = {"ok": "green", "missing": "yellow", "unusable": "red"}.get(r.status, "")
        table.add_row(escape(r.what), f"[{style}]{r.status}[/]" if style else r.status, escape(r.detail))
    out = Console(highlight=False, soft_wrap=True)
    out.print(table)
    unusable = [r for r in measured if r.status == "unusable"]  # the CPU path itself (TensorRT unusable on a CPU machine is not)
    missing = missing_for_tensorrt()
    if unusable:
        out.print(f"not ready: {len(unusable)} problem(s) above ({', '.join(r.what for r in unusable)})", markup=False)
    elif missing:
        out.print(f"backends: onnxruntime and torch ready; tensorrt not usable here ({len(missing)} missing above)", markup=False)
    else:
        out.print("backends: onnxruntime, torch and tensorrt ready (build engines with: ultrastyle build BUNDLE)", markup=False)
    raise typer.Exit(1 if unusable else 0)
