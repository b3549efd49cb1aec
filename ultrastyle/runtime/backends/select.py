"""Choosing a backend and opening a runner for a model given by zoo name, weights folder or bundle.

``auto`` picks TensorRT where a GPU, TensorRT and a CUDA binding are present
and the model's bundle already has fresh engines for this GPU and TensorRT
version at the asked precision (``ultrastyle build``); else ONNX Runtime (with
``--device cuda``: its CUDA provider where onnxruntime-gpu is installed, else
PyTorch). ONNX Runtime and TensorRT run a bundle; for a zoo model or a weights
folder the bundle is exported on first use and cached under
``$ULTRASTYLE_HOME/bundles/<model>-<weights digest>`` (re-exported when the
weights change). ``backend="tensorrt"`` builds missing or stale engines on
first use, the way the bundle itself is exported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ultrastyle import options as check
from ultrastyle.core.arch import STAGES
from ultrastyle.errors import Placeholder, Remedy, Setting, remedied
from ultrastyle.export.bundle import Bundle, BundleError, bundle_in_use, derived_work, export_bundle, is_bundle, read_bundle
from ultrastyle.export.spec import ExportSpec
from ultrastyle.io.atomic import is_unwritable
from ultrastyle.models import zoo
from ultrastyle.models.pretrained import DEFAULT_MODEL, load_model
from ultrastyle.models.sources import check_stages, model_files, model_folder
from ultrastyle.options import OptionError
from ultrastyle.runtime.backends.base import Runner, RunnerError, bundle_stages

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def weights_digest(source: str | Path, stages: tuple[int, ...] | None = None) -> tuple[str, dict[str, str]]:
    """(model name, {file: sha256}) of a weights folder or an installed zoo model.

    The files themselves are hashed (about 10 MB for CD 16x), so a bundle is
    keyed by what will actually be exported, not by what the registry promises.
    ``stages`` None: every stage the model has; one it lacks raises
    ``CheckpointError`` (`check_stages`).
    """
    path = model_folder(source)
    name = path.name if path is not None else zoo.get_entry(str(source)).name
    folder = path if path is not None else zoo.model_dir(name)
    stages = check_stages(source, stages)
    # Cached: zoo.ensure has just hashed these same files to check them.
    return name, {f: zoo.sha256_file_cached(folder / f) for f in model_files(source, stages)}


def bundle_dir_for(name: str, files: dict[str, str]) -> Path:
    digest = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:12]
    return zoo.bundles_dir() / f"{name}-{digest}"  # zoo.cached_bundles finds them by this name


def ensure_bundle(
    source: str | Path = DEFAULT_MODEL,
    *,
    stages: tuple[int, ...] | None = None,
    progress: bool = True,
    on_export: Callable[[str], None] | None = None,
) -> Bundle:
    """The cached bundle of a zoo model or weights folder, exported on first use.

    ``stages`` None: every stage the model has. A stage the model lacks raises
    ``CheckpointError`` naming the stages it has, before anything is downloaded.
    """
    if is_bundle(source):
        return read_bundle(source)
    stages = check_stages(source, stages)
    if model_folder(source) is None:
        zoo.ensure(str(source), progress=progress)
    found = _find_bundle(source, stages)
    if found is not None:
        return found
    name, files = weights_digest(source, stages)
    target, damaged, lost = _cache_repair(name, files)
    if on_export:
        on_export(f"the cached bundle of {name} is damaged ({damaged}); exporting it again into {target} (int8 graphs calibrated "
                  "there must be calibrated again)" if damaged is not None else  # fmt: skip
                  f"exporting {name} to ONNX again into {target}, which lacks graphs this release runs; the {lost} it holds are "
                  "deleted (calibrate and build again)" if lost else f"exporting {name} to ONNX (first use) into {target}")  # fmt: skip
    model = load_model(source, stages=stages, progress=progress)
    try:
        if damaged is not None and target.is_dir() and not target.is_symlink():  # the cache's own folder: made again whole
            with bundle_in_use(target):  # not while another process exports or calibrates it; it may have repaired it since
                try:
                    return read_bundle(target)
                except BundleError:
                    with contextlib.suppress(FileNotFoundError):  # gone already: another run removed it first
                        shutil.rmtree(target)
        # force: the cache's own folder, whose int8 graphs and engines are said above to be lost (a damaged one is removed before)
        return export_bundle(model, target, spec=ExportSpec(stages=tuple(sorted(set(stages)))), source_weights=files, force=True)
    except OSError as exc:  # a read-only ULTRASTYLE_HOME (permissions or a read-only mount): say where, and the ways round it
        if not is_unwritable(exc):
            raise
        fix = Remedy("export_model", (str(source), Placeholder("BUNDLE_FOLDER")))
        raise remedied(BundleError(f"cannot write the bundle cache {target.parent} ({exc.strerror}); set ULTRASTYLE_HOME to a folder "
                                   f"you can write, export the model once ({fix.python()}) and run from that bundle, or run on the "
                                   "PyTorch backend, which needs no bundle"), fix) from None


def _cache_repair(name: str, files: dict[str, str]) -> tuple[Path, str | None, str]:
    """The cache folder a bundle of these weights is exported into, why the one there is damaged (None: absent, or only
    short of a graph kind this release runs), and the int8 graphs and engines an export there deletes ("": none)."""
    target = bundle_dir_for(name, files)  # a missing or damaged (or older: a graph kind short) cache: exported again
    damaged = None
    if target.exists():
        try:
            read_bundle(target)
        except BundleError as exc:
            damaged = str(exc).split("; ")[0]
    return target, damaged, derived_work(target) if damaged is None else ""


def cache_repair_loss(source: str | Path, stages: tuple[int, ...] | None = None) -> str | None:
    """What the next run of ``source`` on ONNX Runtime would delete by exporting its cached bundle again (damaged, or an
    older release's): its int8 graphs and engines; None where it deletes nothing. Nothing is exported or deleted to find
    out (`doctor` reports it rather than repairs)."""
    if is_bundle(source):
        return None
    stages = check_stages(source, stages)
    if _find_bundle(source, stages) is not None:
        return None
    target, damaged, lost = _cache_repair(*weights_digest(source, stages))
    if damaged is not None:  # a repair that deletes nothing costs an export: not worth a word
        held = derived_work(target)
        return f"the cached bundle {target} is damaged ({damaged}): the next run exports it again, deleting the {held} it holds" if held else None
    return f"the cached bundle {target} lacks graphs this release runs: the next run exports it again, deleting the {lost} it holds" if lost else None


def _find_bundle(source: str | Path, stages: tuple[int, ...]) -> Bundle | None:
    """The cached bundle holding ``stages`` of ``source``'s weights with every graph kind: its own, else the whole model's.

    The whole model's is exported for the default levels, so a run of fewer stages finds it rather than exporting again.
    """
    name, files = weights_digest(source, stages)
    wanted = {f"{kind}{k}" for kind in ExportSpec().kinds for k in stages}
    for candidate in dict.fromkeys((bundle_dir_for(name, files), bundle_dir_for(*weights_digest(source, None)))):
        if not is_bundle(candidate):
            continue
        try:
            bundle = read_bundle(candidate)
        except BundleError:
            continue
        if files.items() <= bundle.manifest["source_weights"].items() and wanted <= set(bundle.manifest["networks"]):
            return bundle
    return None


def _cached_bundle_path(source: str | Path, stages: tuple[int, ...]) -> Path | None:
    """The bundle ``source`` runs from, if it exists already (nothing is exported to find out)."""
    if is_bundle(source):
        return Path(source)
    try:
        found = _find_bundle(source, stages)
    except (zoo.ZooError, OSError, KeyError, ValueError):
        return None
    return found.path if found is not None else None


def tensorrt_engines_ready(source: str | Path, stages: tuple[int, ...] = STAGES, precision: str = "fp32") -> bool:
    """Whether ``source``'s bundle has fresh engines for this GPU and TensorRT (cheap checks first; never raises)."""
    from ultrastyle.trt.env import missing_for_tensorrt

    if missing_for_tensorrt():
        return False
    path = _cached_bundle_path(source, stages)
    if path is None or not (path / "engines").is_dir():
        return False
    try:
        from ultrastyle.trt import engines as eng
        from ultrastyle.trt.env import import_tensorrt, probe_gpus
        from ultrastyle.trt.graphs import graph_sources

        gpu = probe_gpus()[0]
        host = eng.Host(gpu.name, gpu.compute_capability, str(import_tensorrt().__version__))
        folder = eng.engine_dir(path, host)
        manifest = eng.read_manifest(folder)
        bundle = read_bundle(path)
        return not any(
            eng.stale_reasons(manifest, folder, s.network, precision, host=host, graph_sha256=s.sha256)
            for s in graph_sources(bundle, precision, stages)
        )
    except Exception:  # noqa: BLE001 - any doubt means "not ready": auto then takes ONNX Runtime
        return False


def resolve_backend(
    backend: str, device: str, source: str | Path | None = None, stages: tuple[int, ...] = STAGES, precision: str = "fp32"
) -> str:
    """``auto`` -> a concrete backend for ``device`` (TensorRT when ``source`` has fresh engines here)."""
    backend = check.choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    if precision == "bf16":  # only PyTorch runs bfloat16 networks
        return "torch"
    first_gpu = check.device_index(device) == 0  # TensorRT runs on the first visible GPU only (`open_runner`)
    if first_gpu and source is not None and tensorrt_engines_ready(source, stages, precision):
        return "tensorrt"
    if device.startswith("cuda"):
        from ultrastyle.runtime.backends.onnxruntime_backend import providers_for

        # ONNX Runtime only where it has a GPU provider; else PyTorch on the GPU beats ORT on the CPU.
        try:
            providers_for("cuda")
        except RunnerError:
            return "torch"
    return "onnxruntime"


def check_runner_options(
    *, backend: str = "auto", device: str = "cpu", precision: str = "fp32", compile: bool = False, threads: int = 0
) -> tuple[str, str, str]:
    """(backend, device, precision) as spelt here (any case is taken); `OptionError` for a value no runner takes
    (before a model is looked up or opened)."""
    backend, device = check.choice("backend", backend, BACKENDS), check.device("device", device)
    precision = check.choice("precision", precision, PRECISIONS)
    if not isinstance(compile, bool):
        raise OptionError("compile", f"expected True or False, got {compile!r}")
    check.thread_count("threads", threads)
    return backend, device, precision


def cuda_count() -> int:
    """How many CUDA devices PyTorch sees here (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_torch_device(device: str) -> None:
    """`RunnerError` where PyTorch has no CUDA device for ``device`` (``cuda``, ``cuda:N``); the CPU always runs."""
    count = cuda_count() if device.startswith("cuda") else 0
    if (why := check.cuda_shortfall(device, count)) is None:
        return
    if count:
        raise RunnerError(f"device={device!r}: {why}; give one of them")
    raise remedied(RunnerError(f"device={device!r}: {why}; run on the CPU (device='cpu')"),
                   (Setting("device", device), Setting("device", "cpu")))  # fmt: skip


def _precisions(backend: str) -> tuple[str, ...]:
    """The precisions ``backend`` runs, as each backend declares them."""
    if backend == "tensorrt":
        from ultrastyle.trt import PRECISIONS
    elif backend == "onnxruntime":
        from ultrastyle.runtime.backends.onnxruntime_backend import PRECISIONS
    else:
        from ultrastyle.runtime.backends.torch_engine import TORCH_PRECISIONS as PRECISIONS
    return PRECISIONS


def open_runner(
    source: str | Path = DEFAULT_MODEL,
    *,
    backend: str = "auto",
    device: str = "cpu",
    stages: tuple[int, ...] | None = None,
    threads: int = 0,
    progress: bool = True,
    on_export: Callable[[str], None] | None = None,
    precision: str = "fp32",
    compile: bool = False,
) -> Runner:
    """An (inactive) runner for ``source`` on ``backend``; use it as a context manager.

    ``stages`` None: every stage the model (or bundle) has.
    ``precision``: fp32 everywhere; int8 on TensorRT and ONNX Runtime (the
    bundle's Q/DQ graphs from ``ultrastyle calibrate``); fp16 on TensorRT and
    PyTorch (CUDA); bf16 on PyTorch. ``compile``: the PyTorch backend's stage
    networks through ``torch.compile`` (``backend="auto"`` then means torch).
    """
    backend, device, precision = check_runner_options(backend=backend, device=device, precision=precision, compile=compile, threads=threads)
    if stages is None:
        stages = read_bundle(source, verify=False).stages if is_bundle(source) else check_stages(source, None)
    concrete = "torch" if compile and backend == "auto" else resolve_backend(backend, device, source, stages, precision)
    if compile and concrete != "torch":
        raise remedied(RunnerError(f"compile=True runs the torch backend (torch.compile); the {concrete} backend has its own engines"),
                       Setting("compile", True))  # fmt: skip
    allowed = _precisions(concrete)
    if precision not in allowed:
        raise remedied(RunnerError(
            f"precision {precision} does not run on the {concrete} backend"
            + (f" (picked by backend='auto' on {device})" if backend == "auto" else "") + f", which runs {', '.join(allowed)}; "
            + {"fp16": "use the tensorrt backend, or torch on an NVIDIA GPU", "bf16": "use the torch backend"}.get(
                precision, "use the onnxruntime or tensorrt backend"
            )
            + ", or precision='fp32'"
        ), Setting("precision", "fp32"))
    if concrete == "tensorrt":
        if (index := check.device_index(device)) != 0:  # its engines and buffers live on the current CUDA device
            raise remedied(RunnerError(f"the tensorrt backend runs on the first visible GPU, not {device}; choose the GPU with "
                                       f"CUDA_VISIBLE_DEVICES={index} and device='cuda'"), Setting("device", "cuda"))  # fmt: skip
        return _open_tensorrt(source, stages=stages, precision=precision, progress=progress, on_export=on_export)
    if concrete == "torch":
        if is_bundle(source):
            raise RunnerError(
                f"{source} is a bundle of ONNX graphs, which the torch backend cannot run; "
                "use the onnxruntime backend, or give the weights folder / zoo name"
            )
        from ultrastyle.runtime.backends.torch_backend import TorchRunner

        require_torch_device(device)
        model = load_model(source, stages=stages, device=device, progress=progress)
        return TorchRunner(model, threads=threads, precision=precision, compile=compile)
    from ultrastyle.runtime.backends.onnxruntime_backend import OnnxRuntimeRunner, providers_for

    providers = providers_for(device)

    bundle = ensure_bundle(source, stages=stages, progress=progress, on_export=on_export)
    # cuda:N: the CUDA provider's GPU N (else its first, whatever was asked)
    return OnnxRuntimeRunner(bundle, threads=threads, providers=providers, precision=precision, stages=stages,
                             device_id=check.device_index(device))  # fmt: skip


def _open_tensorrt(
    source: str | Path, *, stages: tuple[int, ...], precision: str, progress: bool, on_export: Callable[[str], None] | None
) -> Runner:
    """A TensorRT runner; the bundle is exported and the engines built on first use (minutes, once per GPU)."""
    from ultrastyle.runtime.backends.tensorrt_backend import TensorRTRunner
    from ultrastyle.trt.build import build_engines
    from ultrastyle.trt.env import require_tensorrt_stack
    from ultrastyle.trt.graphs import GraphError
    from ultrastyle.trt.profiles import default_ranges

    cpu = Setting("backend", "onnxruntime")
    try:
        gpu = require_tensorrt_stack(instead=f"give {cpu.python()} to run on the CPU")  # before any export: all that is missing
    except RunnerError as exc:
        raise remedied(exc, cpu) from None
    bundle = ensure_bundle(source, stages=stages, progress=progress, on_export=on_export)
    bundle_stages(bundle, stages)  # before any engine is built
    try:
        build_engines(
            bundle, precision=precision, ranges=default_ranges(bundle.arch, stages, precision), stages=stages,
            keep_smaller_profiles=True,
            on_step=(lambda msg: on_export(f"TensorRT for {gpu.name} (first use; building the engines ahead of time saves this wait): {msg}"))
            if on_export else None,
        )  # fmt: skip
    except GraphError as exc:  # its remedy goes with it
        raise remedied(RunnerError(str(exc)), getattr(exc, "remedy", None)) from exc
    return TensorRTRunner(bundle, precision=precision, stages=stages)
