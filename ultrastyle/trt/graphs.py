"""Which ONNX graph each engine is built from, per precision.

Per stage k: ``encoderK``, ``decoderK``, ``decoder_affineK`` from the bundle,
and ``statsK``, the pass-1 statistics graph generated for the stage's feature
width (`export.stats_graph`; no weights, so not stored in the bundle).

- fp32: the bundle's graphs as they are.
- fp16: the same graphs converted to float16 compute with float32 I/O
  (`trt.fp16`), in memory, at build time; TensorRT 11 builds them strongly
  typed. The statistics graph stays float32 (its sums overflow float16).
- int8: explicitly quantized (Q/DQ) graphs, which ``ultrastyle calibrate``
  (`ultrastyle.calibration`) stores in the bundle as ``networks[name]["int8"] = {"file",
  "sha256"}`` beside the float32 graph. A network without one is built from
  its float32 graph (calibration may keep a network in float on purpose).
  TensorRT 11 has no implicit INT8 calibration, so without any Q/DQ graph
  there is no int8 build.

The recorded ``graph_sha256`` identifies the exact bytes an engine came from
(for fp16 the source graph's sha256 plus the conversion's version), which is
what makes an engine stale when a graph is re-exported.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from ultrastyle.errors import Placeholder, Remedy, remedied
from ultrastyle.export.bundle import Bundle, load_graph, remake
from ultrastyle.export.int8 import calibrate_more, calibrated_activations, int8_graph, recalibrate
from ultrastyle.export.stats_graph import build_stats_graph, stats_network_name
from ultrastyle.io.digest import sha256_file

FP16_CONVERSION_VERSION = 1
STAGE_KINDS = ("encoder", "decoder", "decoder_affine", "stats")


class GraphError(ValueError):
    """A bundle that lacks the graphs a precision needs (says which and how to make them)."""


class BundleRefused(GraphError):
    """The bundle cannot give the graphs asked for (stages it lacks, int8 graphs it lacks or of other activations): refused
    before any build, as `stylize` refuses such a bundle."""


@dataclass
class GraphSource:
    network: str  # "encoder3", "stats3"
    kind: str
    stage: int
    label: str  # the bundle file it comes from, or "generated:stats_c64"
    sha256: str  # identifies the bytes built (see module docstring)
    loader: Callable[[], onnx.ModelProto]
    quantized: bool = False

    def load(self) -> onnx.ModelProto:
        return self.loader()


def _fp16_sha(source_sha: str) -> str:
    return hashlib.sha256(f"{source_sha}:fp16-conversion-v{FP16_CONVERSION_VERSION}".encode()).hexdigest()


def _stats_sha(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def graph_sources(bundle: Bundle, precision: str, stages: tuple[int, ...] | None = None) -> list[GraphSource]:
    """Every graph an engine set at ``precision`` is built from, in build order."""
    from ultrastyle.trt.fp16 import convert_to_fp16

    if precision not in ("fp32", "fp16", "int8"):
        raise GraphError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    stages = tuple(stages or bundle.stages)
    if why := bundle.stages_problem(stages):
        raise BundleRefused(why)
    nets = bundle.manifest["networks"]
    if precision == "int8":
        calibrated = sorted({e["stage"] for n, e in nets.items() if isinstance(e, dict) and int8_graph(bundle, n)})
        fix = Remedy("calibrate", (str(bundle.path), Placeholder("YOUR_PHOTOS/")), (("activations", "int8"),))
        if not calibrated:
            raise remedied(BundleRefused(
                f"bundle {bundle.path} has no int8 (Q/DQ) graphs: TensorRT 11 builds INT8 only from explicitly quantized "
                f"graphs (its implicit INT8 calibration was removed); create them with {fix.python()} "
                "(int8 calibration on sample photos), or build fp16 or fp32 engines"
            ), fix)  # fmt: skip
        activations = calibrated_activations(bundle.manifest)
        if activations != "int8":  # before stages missing: calibrating those alike would be refused here next
            fix = recalibrate(bundle, activations="int8")
            raise remedied(BundleRefused(
                f"bundle {bundle.path} was calibrated with {activations} activations, for ONNX Runtime on the CPU; "
                f"TensorRT's INT8 is signed with zero-point 0: calibrate again with {fix.python()}"
            ), fix)  # fmt: skip
        if bare := [k for k in stages if k not in calibrated]:  # they would build in float32 without a word
            more = calibrate_more(bundle, bare)
            raise remedied(BundleRefused(
                f"bundle {bundle.path} has int8 graphs for stage(s) {calibrated}, not for {bare}; calibrate those stages too "
                f"({more.python()}), or build only stages {calibrated}"
            ), more)  # fmt: skip
    out: list[GraphSource] = []
    for k in stages:
        for kind in ("encoder", "decoder", "decoder_affine"):
            name = f"{kind}{k}"
            if name not in nets:
                fix = remake(bundle.path, bundle.manifest)
                raise remedied(GraphError(f"bundle {bundle.path} lacks {name}; export it again: {fix.python()}"), fix)
            path = bundle.path / nets[name]["file"]
            sha = nets[name]["sha256"]
            q = int8_graph(bundle, name) if precision == "int8" else None
            if q is not None:
                qpath = bundle.path / Path(q["file"]).name
                out.append(GraphSource(name, kind, k, qpath.name, q["sha256"], _loader(qpath), quantized=True))
            elif precision == "fp16":
                out.append(GraphSource(name, kind, k, path.name, _fp16_sha(sha), lambda p=path: convert_to_fp16(load_graph(p))))
            else:
                out.append(GraphSource(name, kind, k, path.name, sha, _loader(path)))
        c = bundle.arch.feature_channels(k)
        stats = build_stats_graph(c, opset=max(13, int(bundle.manifest.get("opset", 17))))
        out.append(GraphSource(f"stats{k}", "stats", k, f"generated:{stats_network_name(c)}", _stats_sha(stats), lambda m=stats: m))
    return out


def _loader(path: Path) -> Callable[[], onnx.ModelProto]:
    def load() -> onnx.ModelProto:
        return load_graph(path)

    return load


def verify_int8_file(bundle: Bundle, source: GraphSource) -> None:
    """A Q/DQ graph's bytes against the sha256 calibration recorded (the bundle reader checks only the fp32 graphs)."""
    path = bundle.path / source.label
    fix = recalibrate(bundle, source.network)
    if not path.is_file():
        raise remedied(GraphError(f"{path}: int8 graph listed for {source.network} is missing; calibrate again: {fix.python()}"), fix)
    if sha256_file(path) != source.sha256:
        raise remedied(GraphError(f"{path}: sha256 does not match the manifest's; the int8 graph was modified, calibrate again: {fix.python()}"), fix)
