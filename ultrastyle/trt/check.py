"""Static TensorRT compatibility of a bundle: ``ultrastyle build BUNDLE --check``, no GPU needed.

Three kinds of finding, each naming the graph and node:

1. TensorRT's ONNX parser. Ops and attribute combinations are checked against
   the support matrix NVIDIA publishes with the parser, onnx-tensorrt
   ``docs/operators.md`` (TensorRT 10.15 edition: opsets 9..24; TensorRT 10.0
   documents 9..20), and against what its importer (``onnxOpImporters.cpp``)
   accepts: ``MaxPool`` without the ``Indices`` output and with unit
   dilations; ``Resize`` modes nearest/linear, the five coordinate
   transformation modes, four nearest modes, no antialiasing, aspect policy
   ``stretch``; ``Q``/``DQ`` with zero-point 0 (symmetric, signed INT8), given
   explicitly on every ``QuantizeLinear`` (ONNX's default is UINT8);
   ``ReduceX`` axes as initializers; ``Cast`` to TensorRT types.
2. Explicit quantization (TensorRT developer guide, "Explicit Quantization";
   TensorRT 11 has no other INT8): scales are positive constants, zero-points
   are int8 zeros, every ``QuantizeLinear`` feeds only ``DequantizeLinear``
   nodes, every ``DequantizeLinear`` reads a ``QuantizeLinear`` or an int8
   initializer (pre-quantized weights).
3. ultrastyle's own contract for stage graphs, which the runner's exactness
   depends on: pads are initializers and reflect (the architecture pads by
   reflection; TensorRT could parse ``edge`` or ``wrap`` too, but the engine
   would then not compute the exported model), upsampling is nearest x2
   (asymmetric, floor), I/O is float32, weights are constants.

Errors make the bundle incompatible (exit 1); warnings (stale engines, opsets
newer than TensorRT 10.0 documents) do not. The check also converts every
graph to fp16 in memory when asked for that precision, and checks the
optimisation profiles against each stage's grid and halos.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ultrastyle.errors import Remedies, Remedy
from ultrastyle.export.bundle import Bundle
from ultrastyle.trt import engines as eng
from ultrastyle.trt.graphs import GraphError, graph_sources, verify_int8_file
from ultrastyle.trt.profiles import PROFILE_SETTINGS, TileRange, profile_problems

OPSET_MIN, OPSET_MAX = 9, 24  # operators.md, TensorRT 10.15
OPSET_ALL_10X = 20  # the newest opset TensorRT 10.0 documents

# Operators marked supported ("Y") in onnx-tensorrt docs/operators.md (TensorRT 10.15).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
PAD_MODES = {"constant", "reflect", "edge", "wrap"}  # what the importer maps (kFILL, kREFLECT, kCLAMP, kWRAP)
# operators.md, Cast: FP32, FP16, BF16, INT32, INT64, UINT8, BOOL (no INT8: int8 comes from Q/DQ only).
CAST_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
              TensorProto.UINT8, TensorProto.BOOL}  # fmt: skip
Q_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
REDUCE_OPS = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSum", "ReduceSumSquare"}  # fmt: skip
STAGE_KINDS = {"encoder", "decoder", "decoder_affine", "encoder_aux"}


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    where: str  # "encoder3.onnx: node Pad_5" / "stage 3 profile" / "engines/..."
    message: str
    remedy: Remedies = None  # the fix its message shows as Python (`errors.Remedy`)

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    graphs: int = 0
    nodes: int = 0
    ranges: dict[int, TileRange] = field(default_factory=dict)  # the tile profiles checked, per stage
    bundle: Path | None = None  # the bundle checked

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors


class _Graph:
    """Lookups over one model: initializers (and Constant outputs), producers, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.const_types = {i.name: i.data_type for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                        self.const_types[n.output[0]] = a.t.data_type
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# One checker per op kind: (node, its attributes, the graph, whether ultrastyle's stage contract applies)
# -> the messages of its errors. The table below says which ops have one.
_Problems = Iterator[str]


def _maxpool(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
    if len([o for o in node.output if o]) > 1:
        yield "MaxPool with the Indices output: TensorRT supports only the pooled output; drop the second output"
    if any(d != 1 for d in a.get("dilations", [])):
        yield f"MaxPool dilations {a['dilations']}: TensorRT needs them empty or all ones"
    if len(a.get("kernel_shape", [])) not in (2, 3):
        yield f"MaxPool kernel {a.get('kernel_shape')}: TensorRT pools in 2D or 3D only"
    if contract and (list(a.get("kernel_shape", [])) != [2, 2] or list(a.get("strides", [])) != [2, 2] or any(a.get("pads", [])) or a.get("ceil_mode", 0)):
        yield "stage networks pool 2x2 with stride 2, no pads, floor mode; this MaxPool does not (the tile grid assumes it)"


def _pad(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
    mode = _s(a.get("mode", b"constant"))
    if mode not in PAD_MODES:
        yield f"Pad mode {mode!r}: TensorRT's importer maps constant, reflect, edge and wrap only"
    pads = node.input[1] if len(node.input) > 1 else ""
    if pads and g.const(pads) is None:
        yield ("Pad's pads are computed at run time; ultrastyle needs them as an initializer (static shapes for the "
               "optimisation profile; constant-fold the graph)")  # fmt: skip
    if len(node.input) > 3 and node.input[3] and g.const(node.input[3]) is None:
        yield "Pad's axes are computed at run time; give them as an initializer"
    if contract and mode != "reflect":
        yield (f"Pad mode {mode!r} where the stage networks pad by reflection: TensorRT could run it, but the "
               "engine would not compute the exported architecture; re-export the bundle")  # fmt: skip


def _resize(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
    op = node.op_type
    mode = _s(a.get("mode", b"nearest"))
    if mode not in RESIZE_MODES:
        yield f"Resize mode {mode!r}: TensorRT's support matrix lists nearest and linear only (operators.md)"
    coord = _s(a.get("coordinate_transformation_mode", b"half_pixel"))
    if op == "Resize" and coord not in RESIZE_COORDS:
        yield f"Resize coordinate_transformation_mode {coord!r}: TensorRT supports {', '.join(sorted(RESIZE_COORDS))}"
    nearest = _s(a.get("nearest_mode", b"round_prefer_floor"))
    if mode == "nearest" and nearest not in RESIZE_NEAREST:
        yield f"Resize nearest_mode {nearest!r}: TensorRT supports {', '.join(sorted(RESIZE_NEAREST))}"
    if a.get("antialias", 0):
        yield "Resize with antialias: not supported by TensorRT"
    if _s(a.get("keep_aspect_ratio_policy", b"stretch")) != "stretch":
        yield "Resize keep_aspect_ratio_policy must be 'stretch' for TensorRT"
    scales = node.input[2] if op == "Resize" and len(node.input) > 2 else (node.input[1] if op == "Upsample" and len(node.input) > 1 else "")
    sizes = node.input[3] if len(node.input) > 3 else ""
    if scales and g.const(scales) is None or sizes and g.const(sizes) is None:
        yield "Resize scales/sizes are computed at run time; ultrastyle needs constant scales (static tile shapes)"
    if contract:
        sc = g.const(scales) if scales else None
        if mode != "nearest" or coord != "asymmetric" or nearest != "floor" or sc is None or list(np.asarray(sc).reshape(-1)) != [1, 1, 2, 2]:
            yield ("stage decoders upsample nearest x2 (asymmetric, floor: PyTorch's nearest); this Resize does "
                   "not, so the engine would not compute the exported model")  # fmt: skip


def _const_axes(wording: str) -> Callable[[onnx.NodeProto, dict, _Graph, bool], _Problems]:
    def check(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
        if len(node.input) > 1 and node.input[1] and g.const(node.input[1]) is None:
            yield f"{node.op_type} axes must be {wording} for TensorRT (operators.md)"

    return check


def _cast(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
    if a.get("to") not in CAST_TYPES:
        yield f"Cast to {TensorProto.DataType.Name(a.get('to', 0))}: not a TensorRT type"


def _conv(node: onnx.NodeProto, a: dict, g: _Graph, contract: bool) -> _Problems:
    w = node.input[1]
    src = g.producer.get(w)
    if len(a.get("kernel_shape", [3, 3])) not in (1, 2, 3):
        yield f"{node.op_type} kernel {a.get('kernel_shape')}: TensorRT convolves in 1D, 2D or 3D only"
    if contract and g.const(w) is None and not (src is not None and src.op_type == "DequantizeLinear" and g.const(src.input[0]) is not None):
        yield "convolution weights are computed at run time; stage graphs carry constant weights (re-export)"


_NODE_CHECKS: dict[str, Callable[[onnx.NodeProto, dict, _Graph, bool], _Problems]] = {
    "MaxPool": _maxpool,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    **{op: _const_axes("an initializer") for op in REDUCE_OPS},
    "Squeeze": _const_axes("resolvable to a constant"),
    "Unsqueeze": _const_axes("resolvable to a constant"),
    "Cast": _cast,
    "Conv": _conv,
    "ConvTranspose": _conv,
}


def check_model(model: onnx.ModelProto, label: str, *, kind: str | None = None) -> list[Finding]:
    """Findings for one graph; ``kind`` (a stage network kind) also applies ultrastyle's contract."""
    out: list[Finding] = []
    g = _Graph(model)
    contract = kind in STAGE_KINDS

    def err(node: onnx.NodeProto | None, msg: str, severity: str = "error") -> None:
        where = f"{label}: node {node.name or node.op_type} ({node.op_type})" if node is not None else label
        out.append(Finding(severity, where, msg))

    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if not OPSET_MIN <= imp.version <= OPSET_MAX:
                err(None, f"opset {imp.version} is outside what TensorRT's ONNX parser supports ({OPSET_MIN}..{OPSET_MAX}); re-export the bundle with opset 17")
            elif imp.version > OPSET_ALL_10X:
                err(None, f"opset {imp.version} needs TensorRT >= 10.15 (TensorRT 10.0 documents up to {OPSET_ALL_10X}); opset 17 works with every 10.x and 11", "warning")
        elif imp.domain != "ai.onnx.ml" or any(n.domain == imp.domain for n in model.graph.node):
            err(None, f"operator domain {imp.domain!r} is not ONNX's: TensorRT would need a plugin for its ops")
    if contract:
        for vi in list(model.graph.input) + list(model.graph.output):
            t = vi.type.tensor_type.elem_type
            if t != TensorProto.FLOAT:
                err(None, f"graph input/output {vi.name!r} is {TensorProto.DataType.Name(t)}; the runner binds float32 buffers (convert with keep_io_types)")

    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            err(node, f"custom-domain op {node.domain}::{op} has no TensorRT importer (a plugin would be needed)")
        elif op not in SUPPORTED_OPS:
            err(node, f"{op} is not supported by TensorRT's ONNX parser (onnx-tensorrt operators.md)")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            out.extend(_check_qdq(node, g, label))
        elif op in _NODE_CHECKS:
            for msg in _NODE_CHECKS[op](node, _attrs(node), g, contract):
                err(node, msg)
    return out


def _output_dtype(node: onnx.NodeProto) -> int | None:
    """A QuantizeLinear's ``output_dtype`` attribute (opset 21+), which sets its type when no zero-point does."""
    return _attrs(node).get("output_dtype")


def _check_qdq(node: onnx.NodeProto, g: _Graph, label: str) -> list[Finding]:
    where = f"{label}: node {node.name or node.op_type} ({node.op_type})"
    found: list[Finding] = []

    def err(msg: str) -> None:
        found.append(Finding("error", where, msg))

    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        err("Q/DQ scale is computed at run time; TensorRT needs it as a build-time constant (initializer)")
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        err("Q/DQ scale has zero, negative or non-finite values; TensorRT needs positive scales")
    if node.op_type == "QuantizeLinear" and not (len(node.input) > 2 and node.input[2]) and _output_dtype(node) not in Q_TYPES:
        err("QuantizeLinear without a zero-point: ONNX then quantizes to UINT8 while TensorRT computes signed INT8, so the "
            "two would not compute the same; give an int8 zero-point of 0")  # fmt: skip
    if len(node.input) > 2 and node.input[2]:
        zp_name = node.input[2]
        zp = g.const(zp_name)
        if zp is None:
            err("Q/DQ zero-point is computed at run time; TensorRT needs a constant zero")
        else:
            if np.any(np.asarray(zp, np.float64) != 0):
                err(f"Q/DQ zero-point is {np.asarray(zp).reshape(-1)[:4].tolist()}: TensorRT quantizes symmetrically and needs "
                    "zero-point 0 (quantize with symmetric activations and weights)")  # fmt: skip
            if g.const_types.get(zp_name) not in Q_TYPES:
                t = TensorProto.DataType.Name(g.const_types.get(zp_name, 0))
                err(f"Q/DQ zero-point type {t}: TensorRT's INT8 is signed (use QInt8, not QUInt8, for activations and weights)")
    if node.op_type == "QuantizeLinear":
        for c in g.consumers.get(node.output[0], []):
            if c.op_type != "DequantizeLinear":
                err(f"QuantizeLinear output feeds {c.op_type} {c.name!r}: TensorRT needs every quantized tensor to go straight into a DequantizeLinear")
        if node.output[0] in g.outputs:
            err("QuantizeLinear output is a graph output: TensorRT cannot return quantized tensors from a float graph")
    else:
        src = g.producer.get(node.input[0])
        if src is None:
            if node.input[0] not in g.consts:
                err("DequantizeLinear reads a graph input: quantized inputs are not part of ultrastyle's float32 I/O")
            elif g.const_types.get(node.input[0]) not in Q_TYPES:
                t = TensorProto.DataType.Name(g.const_types.get(node.input[0], 0))
                err(f"DequantizeLinear weights are {t}: pre-quantized weights must be INT8")
        elif src.op_type not in ("QuantizeLinear", "Constant"):
            err(f"DequantizeLinear reads {src.op_type} {src.name!r}; the Q/DQ pattern TensorRT fuses is QuantizeLinear -> DequantizeLinear")
    return found


def check_profiles(bundle: Bundle, ranges: dict[int, TileRange]) -> list[Finding]:
    out = []
    for k, rng in sorted(ranges.items()):
        for msg in profile_problems(bundle.arch, k, rng):
            out.append(Finding("error", f"stage {k} profile", msg, PROFILE_SETTINGS))
        g = bundle.arch.grid(k)
        if rng.min > 2 * g:  # a small image is one region of its own padded size: below the profile, no engine runs it
            out.append(Finding("warning", f"stage {k} profile", (
                f"profile min {rng.min} px: images whose padded side at this stage (a multiple of {g} px) is below "
                f"{rng.min} px cannot run on these engines; the smallest profile min is {2 * g} px")))  # fmt: skip
    return out


def check_engines(bundle: Bundle, sources_by_precision: dict[str, dict[str, str]]) -> list[Finding]:
    """Warnings for every engine that ``build`` would rebuild (and the runner refuse) and why.

    ``sources_by_precision``: precision -> {network: graph sha256} of what the
    bundle holds now. Without a GPU the GPU/TensorRT match is not decided here.
    """
    out = []
    root = Path(bundle.path) / eng.ENGINES_DIR
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            manifest = eng.read_manifest(folder)
        except ValueError as exc:
            out.append(Finding("warning", str(folder), f"{exc}", getattr(exc, "remedy", None)))
            continue
        if manifest is None:
            fix = Remedy("build_tensorrt", (str(bundle.path),))
            out.append(Finding("warning", str(folder), f"engine folder without engines.json: ignored; rebuild with {fix.python()}", fix))
            continue
        if folder.name != manifest.host.folder_name:
            out.append(Finding("warning", str(folder), f"folder name does not match its manifest ({manifest.host.folder_name}): "
                                                       "a copied or renamed folder; its engines are never run"))  # fmt: skip
        for key, entry in sorted(manifest.engines.items()):
            graphs = sources_by_precision.get(entry.precision)
            if graphs is None or entry.network not in graphs:
                continue
            fix = Remedy("build_tensorrt", (str(bundle.path),), (("precision", entry.precision),))
            for reason in eng.stale_reasons(manifest, folder, entry.network, entry.precision, host=None, graph_sha256=graphs[entry.network]):
                out.append(Finding("warning", f"{folder.name}", f"stale: never run, and rebuilt by {fix.python()}: {reason}", fix))
    return out


def check_bundle(
    bundle: Bundle,
    *,
    precisions: Iterable[str] = ("fp32",),
    ranges: dict[int, TileRange] | None = None,
    stages: tuple[int, ...] | None = None,
) -> CheckReport:
    """The whole static check: every graph for every precision asked, the profiles, the engine manifests."""
    report = CheckReport(bundle=bundle.path)
    shas: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    for precision in precisions:
        try:
            sources = graph_sources(bundle, precision, stages)
        except GraphError as exc:
            report.findings.append(Finding("error", f"{bundle.path} ({precision})", str(exc), getattr(exc, "remedy", None)))
            continue
        shas[precision] = {s.network: s.sha256 for s in sources}
        for src in sources:
            label = f"{src.label} ({precision})" if precision != "fp32" else src.label
            if src.sha256 in seen:  # the same bytes were checked for another precision
                continue
            seen.add(src.sha256)
            try:
                if src.quantized:
                    verify_int8_file(bundle, src)
                model = src.load()
            except (GraphError, ValueError, OSError, onnx.checker.ValidationError) as exc:
                report.findings.append(Finding("error", label, f"cannot load or convert the graph: {exc}", getattr(exc, "remedy", None)))
                continue
            report.graphs += 1
            report.nodes += len(model.graph.node)
            report.findings.extend(check_model(model, label, kind=None if src.kind == "stats" else src.kind))
    if ranges is not None:
        report.ranges = dict(ranges)
        report.findings.extend(check_profiles(bundle, ranges))
    report.findings.extend(check_engines(bundle, shas))
    return report
