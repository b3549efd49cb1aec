"""ONNX graphs of stage networks, written from the layer list and the module's weights.

The graph mirrors `Encoder` / `Decoder` layer for layer: reflect ``Pad`` with
constant pads (an initializer, as TensorRT's parser wants), ``Conv``, ``Relu``,
``MaxPool`` 2x2 and nearest ``Resize`` x2 (asymmetric, floor: PyTorch's
``nearest``). Writing the graph from the spec, rather than tracing, keeps it
free of shape-computing subgraphs; `export.validate` proves it equal to the
PyTorch module.

The ``decoder_affine`` variant takes the transform as inputs (``A`` (C, C),
``b`` (C,)) and applies ``A f + b`` as a MatMul before decoding, so the
transform runs where the features are (docs/design.md, "The transforms"). ``decoder_folded`` has
the same inputs and output but folds the map into the decoder's first
convolution instead: reflection padding only copies pixels, so
``conv(W, pad(A f + b)) = conv(W A, pad(f)) + W b``; the folded weights
(O x 9 x C x C multiply-adds) are computed in the graph, and the full-size
MatMul over the feature map, with the layout copies around it, disappears.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ultrastyle.export.spec import NetworkSpec, TensorSpec
from ultrastyle.models.networks import _StageNet


def _value_info(t: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape))


class _Builder:
    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = prefix
        self._n = 0

    def tmp(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, output: str | None = None, **attrs) -> str:
        out = output or self.tmp(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.tmp(op), **attrs))
        return out


def _add_layers(b: _Builder, net: _StageNet, x: str, output: str, fold: tuple[str, str] | None = None) -> dict[str, str]:
    """Append ``net``'s layers; returns each conv's output tensor name (after its ReLU).

    ``fold`` (names of A and b): fold ``A f + b`` into the first layer, which must be a convolution.
    """
    outs: dict[str, str] = {}
    layers = net.layers
    if fold is not None and layers[0].kind != "conv":
        raise ValueError(f"cannot fold the transform into {layers[0].name}: the first layer is not a convolution")
    pads1 = b.const("pads_reflect_1", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    for i, layer in enumerate(layers):
        last = output if i == len(layers) - 1 else None
        if layer.kind == "pool":
            x = b.node("MaxPool", [x], "pool", last, kernel_shape=[2, 2], strides=[2, 2])
        elif layer.kind == "up":
            scales = b.const(b.tmp("scales"), np.array([1, 1, 2, 2], np.float32))
            x = b.node("Resize", [x, "", scales], "up", last, mode="nearest",
                       coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # fmt: skip
        else:
            conv = getattr(net, layer.name)
            weight = conv.weight.detach().cpu().numpy().astype(np.float32)
            w = b.const(f"{layer.name}.weight", weight)
            bias = b.const(f"{layer.name}.bias", conv.bias.detach().cpu().numpy().astype(np.float32))
            if fold is not None and i == 0:
                w, bias = _fold_affine(b, layer.name, weight, bias, *fold)
            if layer.kernel > 1:
                if layer.kernel != 3:
                    raise ValueError(f"{layer.name}: only 1x1 and 3x3 convolutions are exported")
                x = b.node("Pad", [x, pads1], f"{layer.name}_pad", mode="reflect")
            k = layer.kernel
            x = b.node("Conv", [x, w, bias], layer.name, None if layer.relu else last, kernel_shape=[k, k])
            if layer.relu:
                x = b.node("Relu", [x], f"{layer.name}_relu", last)
            outs[layer.name] = x
    return outs


def _fold_affine(b: _Builder, name: str, weight: np.ndarray, bias: str, a: str, shift: str) -> tuple[str, str]:
    """Weights W A (O, C, k, k) and bias bias + Σ W b of a conv that reads ``A f + b``."""
    w_last = b.const(f"{name}.weight_ohwc", np.ascontiguousarray(weight.transpose(0, 2, 3, 1)))  # (O, k, k, C)
    folded = b.node("MatMul", [w_last, a], "fold_w")  # Σ_c W[o, c] A[c, c']
    w = b.node("Transpose", [folded], "fold_w_oihw", perm=[0, 3, 1, 2])
    w_sum = b.const(f"{name}.weight_sum", weight.sum(axis=(2, 3)).astype(np.float32))  # (O, C)
    return w, b.node("Add", [bias, b.node("MatMul", [w_sum, shift], "fold_b")], "fold_bias")


def _add_affine(b: _Builder, features: str, a: str, bias: str) -> str:
    """A f + b on (N, C, h, w) features, as Reshape -> MatMul -> Add -> Reshape."""
    shape = b.node("Shape", [features], "feat_shape")
    flat_shape = b.const("flat_shape", np.array([0, 0, -1], np.int64))
    flat = b.node("Reshape", [features, flat_shape], "flat")
    y = b.node("MatMul", [a, flat], "affine")  # (C, C) x (N, C, hw) -> (N, C, hw)
    axes = b.const("axis1", np.array([1], np.int64))
    col = b.node("Unsqueeze", [bias, axes], "bias_col")
    y = b.node("Add", [y, col], "affine_b")
    return b.node("Reshape", [y, shape], "unflat")


def build_graph(net: _StageNet, spec: NetworkSpec, *, opset: int, doc: str = "") -> onnx.ModelProto:
    """An ONNX model for ``net`` (an `Encoder` or `Decoder`) per ``spec``."""
    b = _Builder()
    x = spec.inputs[0].name
    if spec.kind == "decoder_affine":
        x = _add_affine(b, x, spec.inputs[1].name, spec.inputs[2].name)
    fold = (spec.inputs[1].name, spec.inputs[2].name) if spec.kind == "decoder_folded" else None
    outs = _add_layers(b, net, x, spec.outputs[0].name, fold)
    if spec.kind == "encoder_aux":  # training bundles: Q_b(relu{b}_1) as extra outputs
        for t in spec.outputs[1:]:
            block = t.name.removeprefix("embed")
            aux = getattr(net, f"conv{block}1_aux")
            w = b.const(f"conv{block}1_aux.weight", aux.weight.detach().cpu().numpy().astype(np.float32))
            bias = b.const(f"conv{block}1_aux.bias", aux.bias.detach().cpu().numpy().astype(np.float32))
            b.node("Conv", [outs[f"conv{block}1"], w, bias], f"aux{block}", t.name, kernel_shape=[1, 1])
    graph = helper.make_graph(
        b.nodes, spec.name, [_value_info(t) for t in spec.inputs], [_value_info(t) for t in spec.outputs], b.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ultrastyle")
    model.ir_version = min(model.ir_version, 9)  # readable by ONNX Runtime >= 1.16 and TensorRT 10
    model.doc_string = doc
    return model


@torch.inference_mode()
def torch_reference(net: _StageNet, spec: NetworkSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What PyTorch computes for ``feed``: output name -> array (the validation reference)."""
    from ultrastyle.core.transforms import apply_affine

    x = torch.from_numpy(feed[spec.inputs[0].name])
    if spec.kind in ("decoder_affine", "decoder_folded"):
        x = apply_affine(x, torch.from_numpy(feed["A"]), torch.from_numpy(feed["b"]))
    out = {spec.outputs[0].name: net(x).numpy()}
    if spec.kind == "encoder_aux":
        taps = net.taps(x)
        for t in spec.outputs[1:]:
            block = t.name.removeprefix("embed")
            out[t.name] = getattr(net, f"conv{block}1_aux")(taps[f"relu{block}_1"]).numpy()
    return out
