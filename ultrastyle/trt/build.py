"""Building TensorRT engines for a bundle, TensorRT 10 and 11 by feature detection.

The build follows NVIDIA's Python samples and API reference (TensorRT Python
API, docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/;
bindings in NVIDIA/TensorRT ``python/src/infer/pyCore.cpp``):

    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger); parser.parse(onnx_bytes)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile(); profile.set_shape(name, min, opt, max)
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)  -> False: refused
    plan = builder.build_serialized_network(network, config)
    config.get_timing_cache().serialize()  -> written back to the cache file (None: no cache to keep)

TensorRT 10 vs 11 (migration guide "Migrating from TensorRT 10.x to 11.x"):
every network is built **strongly typed**: ``STRONGLY_TYPED`` is set where the
flag exists (required for strong typing on 10.x, accepted and ignored on 11).
Precision therefore lives in the graph: fp16 graphs are converted before the
build (`trt.fp16`), int8 graphs carry Q/DQ nodes (``ultrastyle calibrate``);
no ``BuilderFlag.FP16``/``INT8`` (deprecated 10.12, removed in 11) and no
``int8_calibrator`` (deprecated 10.1, removed in 11). Only a TensorRT without
the strongly-typed flag (older than 10) would fall back to those flags.
TF32 is off unless asked for (``build_engines(tf32=True)``; TensorRT's default
is on): fp32 engines compute in IEEE float32, as the PyTorch runner does on
CUDA. TF32 keeps 10 mantissa bits of the Conv/MatMul inputs; the whitening
amplifies that to ~3e-2 on the 5-stage cascade (measured with PyTorch on an
H100; 2.3e-2 under the test stand-in's TF32 emulation, 0.15 on a 1200-px
strip), far from the exact-tiling contract. fp16 is the fast precision. The
statistics graph never uses TF32 (its GEMM must keep float32's mantissa).

The timing cache persists across builds (one file per GPU and TensorRT
version, `engines.timing_cache_path`), so rebuilding after a re-export
reuses the measured tactics. A cache TensorRT refuses (``set_timing_cache``
returns False: another device or version, or damaged) is replaced by a fresh
one, and the build says so; without any cache the build still runs.

Every TensorRT object gets the process's one logger (`env.tensorrt_logger`).
Return values that report failure are checked: ``parse``,
``add_optimization_profile`` (-1 for an invalid profile),
``set_timing_cache``, ``build_serialized_network`` (None),
``deserialize_cuda_engine`` (None).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from ultrastyle.errors import Remedy, Setting, remedied
from ultrastyle.export.bundle import Bundle
from ultrastyle.io.atomic import sweep_stale, write_atomic
from ultrastyle.trt import engines as eng
from ultrastyle.trt.env import (
    GpuInfo,
    TensorRTUnavailable,
    TrtFeatures,
    detect_features,
    engine_device_memory,
    import_tensorrt,
    require_tensorrt_stack,
    tensorrt_logger,
)
from ultrastyle.trt.graphs import GraphSource, graph_sources, verify_int8_file
from ultrastyle.trt.profiles import TileRange, network_shapes

DEFAULT_WORKSPACE = 1 << 30


class BuildError(RuntimeError):
    """An engine TensorRT would not build; says which graph, what TensorRT reported and what to try."""


@dataclass
class BuildReport:
    folder: Path
    built: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the build worked around (a refused timing cache)


class NetworkFromOnnx:
    """A strongly typed TensorRT network parsed from an ONNX model (lazy, after Polygraphy's loaders)."""

    def __init__(self, trt: Any, logger: Any, features: TrtFeatures, model: onnx.ModelProto, label: str, bundle: Path | None = None) -> None:
        self.trt, self.logger, self.features, self.model, self.label = trt, logger, features, model, label
        self.bundle = bundle  # where the graph comes from: a parser failure suggests checking it

    def __call__(self, builder: Any) -> tuple[Any, Any]:  # tensorrt's INetworkDefinition and OnnxParser (imported lazily)
        trt = self.trt
        flags = 0
        if self.features.strongly_typed_flag:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(self.model.SerializeToString()):
            errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            fix = Remedy("check_tensorrt", (str(self.bundle) if self.bundle else "BUNDLE",))
            raise remedied(BuildError(f"TensorRT's ONNX parser rejected {self.label}: {errors}; {fix.python()} gives a static report"), fix)
        return network, parser  # the parser must outlive the network's use (it owns the weights)


class EngineFromNetwork:
    """A serialized engine (plan) from a network, a profile and the persistent timing cache."""

    def __init__(self, trt: Any, logger: Any, features: TrtFeatures, *, workspace: int, timing_cache: Path) -> None:
        self.trt, self.logger, self.features = trt, logger, features
        self.workspace, self.timing_cache = workspace, timing_cache
        self.notes: list[str] = []
        self.tf32 = False  # what build_engines asks for the float32 layers of the graphs (never for statistics)

    def __call__(
        self, network_loader: NetworkFromOnnx, shapes: dict, *, precision: str, quantized: bool, tf32: bool
    ) -> tuple[bytes, int]:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network, _parser = network_loader(builder)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace))
        if not tf32 and self.features.tf32_flag:
            config.clear_flag(trt.BuilderFlag.TF32)
        if not self.features.strongly_typed_flag and self.features.weak_typing_flags:
            # Only a TensorRT older than 10: weak typing needs the flags to pick reduced-precision kernels.
            if precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            if quantized:
                config.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        dynamic = _dynamic_inputs(network)
        for name, (mn, opt, mx) in shapes.items():
            if name in dynamic:  # a profile covers dynamic inputs only (A and b have static shapes)
                try:
                    profile.set_shape(name, mn, opt, mx)
                except RuntimeError as exc:  # the binding raises where setDimensions refuses (min <= opt <= max, ranks)
                    raise BuildError(f"TensorRT refused the profile of {network_loader.label} for {name!r} {mn}..{opt}..{mx}: {exc}") from exc
        if config.add_optimization_profile(profile) < 0:
            raise BuildError(f"TensorRT refused the optimisation profile of {network_loader.label}: {shapes} (see its log above)")
        self._set_timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise remedied(BuildError(
                f"TensorRT could not build {network_loader.label} (see its log above); try a larger builder workspace (workspace) or smaller tiles (tile_max)"
            ), (Setting("workspace"), Setting("tile_max")))
        cache = config.get_timing_cache()
        if cache is not None:
            write_atomic(self.timing_cache, bytes(cache.serialize()))
        data = bytes(plan)
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BuildError(f"TensorRT built {network_loader.label} but cannot load the engine it built (see its log above)")
        return data, engine_device_memory(engine)

    def _set_timing_cache(self, config) -> None:
        """The persistent cache, or a fresh one where TensorRT refuses it; none at all if even that is refused."""
        cache_bytes = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        if cache_bytes:
            self.notes.append(
                f"TensorRT refused the timing cache {self.timing_cache} (another GPU or TensorRT version, or damaged); "
                "building with a fresh one, which replaces it"
            )
            cache = config.create_timing_cache(b"")
            if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
                return
        self.notes.append("TensorRT refused an empty timing cache; building without one (tactics are measured again next time)")


def current_host(trt: ModuleType, gpu: GpuInfo) -> eng.Host:
    return eng.Host(gpu.name, gpu.compute_capability, str(trt.__version__))


def build_engines(
    bundle: Bundle,
    *,
    precision: str = "fp32",
    ranges: dict[int, TileRange],
    stages: tuple[int, ...] | None = None,
    workspace: int = DEFAULT_WORKSPACE,
    timing_cache: str | Path | None = None,
    force: bool = False,
    keep_smaller_profiles: bool = False,
    on_step: Callable[[str], None] | None = None,
    verbose: bool = False,
    tf32: bool = False,
) -> BuildReport:
    """Build every stale or missing engine of ``bundle`` at ``precision`` for this GPU; fresh ones are kept.

    An engine whose profile ends below ``ranges`` is rebuilt, unless
    ``keep_smaller_profiles`` (first use from ``stylize``: a profile the user
    built on purpose is kept, and the tiles are fitted to it instead).
    ``tf32``: let float32 convolutions and GEMMs use TF32 (faster on Ampere and
    newer, ~1e-3 per network and ~3e-2 on the cascade; see the module docstring).
    """
    graph_sources(bundle, precision, stages)  # the bundle's own problems first (int8 graphs missing...): they need no GPU to find
    fix = Remedy("check_tensorrt", (str(bundle.path),))
    try:
        gpu = require_tensorrt_stack("building TensorRT engines", f"{fix.python()} checks the bundle without them")
    except TensorRTUnavailable as exc:
        raise remedied(exc, fix) from None
    trt = import_tensorrt()
    features = detect_features(trt)
    logger = tensorrt_logger(trt, verbose=verbose)
    host = current_host(trt, gpu)
    folder = eng.engine_dir(bundle.path, host)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale(folder)  # engines of builds killed mid-write (hundreds of MB each)
    try:
        manifest = eng.read_manifest(folder)
    except ValueError:
        manifest = None  # damaged: every engine in it is rebuilt
    if manifest is None or manifest.host != host:
        manifest = eng.EngineManifest(host)
    manifest.cuda_driver, manifest.nvidia_driver = gpu.cuda_driver, gpu.nvidia_driver
    cache_path = eng.timing_cache_path(host, timing_cache)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(cache_path.parent)
    engine_from = EngineFromNetwork(trt, logger, features, workspace=workspace, timing_cache=cache_path)
    engine_from.tf32 = tf32
    run = _Build(bundle, precision, folder, host, manifest, engine_from, trt, logger, features, workspace, BuildReport(folder))
    t0 = time.perf_counter()
    try:
        run.stale_ones(ranges, stages, force=force, keep_smaller_profiles=keep_smaller_profiles, on_step=on_step)
    finally:
        if verbose:
            tensorrt_logger(trt)  # back to warnings for what runs after the build
    run.report.seconds = time.perf_counter() - t0
    return run.report


@dataclass
class _Build:
    """What every engine of one `build_engines` call shares."""

    bundle: Bundle
    precision: str
    folder: Path
    host: eng.Host
    manifest: eng.EngineManifest
    engine_from: EngineFromNetwork
    trt: ModuleType
    logger: Any
    features: TrtFeatures
    workspace: int
    report: BuildReport

    def stale_ones(
        self, ranges: dict[int, TileRange], stages: tuple[int, ...] | None, *, force: bool, keep_smaller_profiles: bool,
        on_step: Callable[[str], None] | None,
    ) -> None:  # fmt: skip
        """Build each engine that is missing, stale or (``force``) any; the manifest is written after each."""
        for src in graph_sources(self.bundle, self.precision, stages):
            rng = ranges[src.stage]
            key = eng.engine_key(src.network, self.precision)
            reasons = eng.stale_reasons(self.manifest, self.folder, src.network, self.precision, host=self.host, graph_sha256=src.sha256,
                                       need_region=None if keep_smaller_profiles else rng.max)  # fmt: skip
            if not reasons and not force:
                self.report.fresh.append(key)
                continue
            self.report.reasons[key] = reasons or ["rebuild forced"]
            if on_step:
                on_step(f"building {key} (tiles {rng.min}..{rng.max} px)")
            try:
                self.one(src, rng)
            finally:
                for note in self.engine_from.notes:
                    self.report.notes.append(note)
                    if on_step:
                        on_step(note)
                self.engine_from.notes.clear()
            eng.write_manifest(self.folder, self.manifest)  # after each engine: an interrupted build keeps what it finished
            self.report.built.append(key)
        eng.write_manifest(self.folder, self.manifest)

    def one(self, src: GraphSource, rng: TileRange) -> None:
        """One engine: parse, build, write atomically, record in the manifest (not yet written)."""
        if src.quantized:
            verify_int8_file(self.bundle, src)
        model = src.load()
        shapes = network_shapes(src.kind, src.stage, self.bundle.arch, rng)
        t = time.perf_counter()
        data, device_memory = self.engine_from(
            NetworkFromOnnx(self.trt, self.logger, self.features, model, f"{src.network} ({src.label}, {self.precision})", self.bundle.path), shapes,
            precision=self.precision, quantized=src.quantized, tf32=self.engine_from.tf32 and src.kind != "stats",
        )  # fmt: skip
        name = eng.engine_file(src.network, self.precision)
        eng.record_built(hashlib.sha256(data).hexdigest())  # before the file: a run never finds one it does not trust
        write_atomic(self.folder / name, data)
        self.manifest.engines[eng.engine_key(src.network, self.precision)] = eng.EngineEntry(
            network=src.network,
            precision=self.precision,
            file=name,
            sha256=hashlib.sha256(data).hexdigest(),
            graph_sha256=src.sha256,
            graph=src.label,
            profile={n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in shapes.items()},
            tiles=rng.as_dict(),
            settings={
                "workspace": int(self.workspace),
                "tf32": self.engine_from.tf32 and src.kind != "stats",
                "strongly_typed": self.features.strongly_typed_flag or self.features.major >= 11,
                "quantized": src.quantized,
                "device_memory": int(device_memory),
                "build_seconds": round(time.perf_counter() - t, 2),
            },
        )


def _dynamic_inputs(network) -> set[str]:
    """Names of the network's inputs with a -1 dimension."""
    out = set()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if any(int(d) < 0 for d in t.shape):
            out.add(t.name)
    return out


def _parser_error(error) -> str:
    """One IParserError as text: its node and description (``desc()``/``node()`` in the bindings)."""
    try:
        return f"node {error.node()}: {error.desc()}"
    except AttributeError:
        return str(error)
