"""Choosing a backend and opening a runner for a model given by zoo name, weights folder or bundle.

``auto`` picks TensorRT where engines and a GPU are present (not built yet:
issue #6), else ONNX Runtime. ONNX Runtime runs a bundle; for a zoo model or a
weights folder the bundle is exported on first use and cached under
``$ULTRASTYLE_HOME/bundles/<model>-<weights digest>`` (re-exported when the
weights change).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from ultrastyle.export.bundle import Bundle, BundleError, export_bundle, is_bundle, read_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.models import zoo
from ultrastyle.models.pretrained import DEFAULT_MODEL, cd_file_names, cd_files_present, load_model
from ultrastyle.models.spec import STAGES
from ultrastyle.runtime.backends.base import Runner, RunnerError

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def weights_digest(source: str | Path, stages: tuple[int, ...] = STAGES) -> tuple[str, dict[str, str]]:
    """(model name, {file: sha256}) of a weights folder or an installed zoo model.

    The files themselves are hashed (about 10 MB for CD 16x), so a bundle is
    keyed by what will actually be exported, not by what the registry promises.
    """
    path = Path(source)
    name = path.name if path.is_dir() else zoo.get_entry(str(source)).name
    folder = path if path.is_dir() else zoo.model_dir(name)
    return name, {f: zoo.sha256_file(folder / f) for f in cd_file_names(stages)}


def bundle_dir_for(name: str, files: dict[str, str]) -> Path:
    digest = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:12]
    return zoo.home_dir() / "bundles" / f"{name}-{digest}"


def ensure_bundle(
    source: str | Path = DEFAULT_MODEL,
    *,
    stages: tuple[int, ...] = STAGES,
    progress: bool = True,
    on_export: Callable[[str], None] | None = None,
) -> Bundle:
    """The cached bundle of a zoo model or weights folder, exported on first use."""
    if is_bundle(source):
        return read_bundle(source)
    if Path(source).is_dir() and not cd_files_present(Path(source), stages):
        load_model(source, stages=stages)  # raises the error that lists the missing files
    if not Path(source).is_dir():
        zoo.ensure(str(source), progress=progress)
    name, files = weights_digest(source, stages)
    target = bundle_dir_for(name, files)
    if is_bundle(target):
        try:
            bundle = read_bundle(target)
            if bundle.manifest["source_weights"] == files and set(stages) <= set(bundle.stages):
                return bundle
        except BundleError:
            pass  # a damaged cache is re-exported below
    if on_export:
        on_export(f"exporting {name} to ONNX (first use) into {target}")
    model = load_model(source, stages=stages, progress=progress)
    return export_bundle(model, target, spec=ExportSpec(stages=tuple(sorted(stages))), source_weights=files)


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> a concrete backend for ``device``."""
    if backend not in BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device == "cuda":
        from ultrastyle.runtime.backends.onnxruntime_backend import providers_for

        # ONNX Runtime only where it has a GPU provider; else PyTorch on the GPU beats ORT on the CPU.
        try:
            providers_for("cuda")
        except RunnerError:
            return "torch"
    return "onnxruntime"


def open_runner(
    source: str | Path = DEFAULT_MODEL,
    *,
    backend: str = "auto",
    device: str = "cpu",
    stages: tuple[int, ...] = STAGES,
    threads: int = 0,
    progress: bool = True,
    on_export: Callable[[str], None] | None = None,
) -> Runner:
    """An (inactive) runner for ``source`` on ``backend``; use it as a context manager."""
    concrete = resolve_backend(backend, device)
    if concrete == "tensorrt":
        raise RunnerError(
            "the TensorRT backend is not built yet (tracked in issue #6); use --backend onnxruntime or torch"
        )
    if concrete == "torch":
        if is_bundle(source):
            raise RunnerError(
                f"{source} is a bundle of ONNX graphs, which the torch backend cannot run; "
                "use --backend onnxruntime, or give the weights folder / zoo name"
            )
        from ultrastyle.runtime.backends.torch_backend import TorchRunner

        if device == "cuda" and not torch.cuda.is_available():
            raise RunnerError("--device cuda: no CUDA device is available to PyTorch here; use --device cpu")
        return TorchRunner(load_model(source, stages=stages, device=device, progress=progress), threads=threads)
    from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner, providers_for

    providers = providers_for(device)

    bundle = ensure_bundle(source, stages=stages, progress=progress, on_export=on_export)
    missing = set(stages) - set(bundle.stages)
    if missing:
        raise RunnerError(f"bundle {bundle.path} lacks stage(s) {sorted(missing)}; it has {list(bundle.stages)}")
    return OnnxRuntimeRunner(bundle, threads=threads, providers=providers)
