"""FP16 by converting the graph's types before the build (TensorRT 11 has no FP16 builder flag).

TensorRT 11 removed the weak-typing precision flags (``BuilderFlag.FP16`` and
friends, deprecated in 10.12) and builds every network strongly typed: a
tensor runs in the type the ONNX graph gives it. NVIDIA's migration guide
("Migrating from Weak Typing to Strong Typing", docs.nvidia.com/deeplearning/
tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html)
converts the model with ModelOpt AutoCast, ``keep_io_types=True``, before
building. Our stage graphs are small straight-line CNNs, so the same
conversion is done here with ``onnx`` alone, on the CPU, where it can be
tested (tests/test_trt_units.py runs the result in ONNX Runtime):

- float32 initializers become float16, except inputs that ONNX defines as
  float32 whatever the data type (``Resize``'s ``roi`` and ``scales``);
- graph inputs and outputs stay float32 (``keep_io_types``): a ``Cast`` after
  each input and before each output, so the runner's buffers and the
  pipeline's tensors are float32 for every precision;
- nodes named in ``keep_fp32`` stay float32, with casts at their borders
  (nothing in the stage graphs needs it; the statistics graph is never
  converted: its sums would overflow float16).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (op_type, input index) that ONNX types as float32 regardless of the data.
FLOAT32_ONLY_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor (inputs, initializers, intermediates, outputs)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    out = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    return out


def convert_to_fp16(model: onnx.ModelProto, *, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` computing in float16 with float32 inputs and outputs."""
    src = onnx.ModelProto()
    src.CopyFrom(model)
    floats = _float_tensors(src)
    g = src.graph
    blocked = set(keep_fp32)
    inits = {i.name: i for i in g.initializer}
    graph_inputs = {i.name for i in g.input}
    graph_outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}

    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}  # (tensor, to-type) -> cast output name
    fp16_inits: dict[str, str] = {}  # float32 initializer -> its float16 copy

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            out = f"{name}__{suffix}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"cast_{out}", to=to))
            casts[key] = out
        return casts[key]

    def is_low(node: onnx.NodeProto | None) -> bool:
        return node is not None and node.name not in blocked

    def fp16_init(name: str) -> str:
        if name not in fp16_inits:
            arr = numpy_helper.to_array(inits[name]).astype(np.float16)
            new_name = f"{name}__fp16"
            g.initializer.append(numpy_helper.from_array(arr, new_name))
            fp16_inits[name] = new_name
        return fp16_inits[name]

    # Graph outputs produced in float16 get a final Cast back to float32 under the output's name.
    renamed_outputs = {o: f"{o}__fp16out" for o in graph_outputs if o in floats and is_low(producer.get(o))}

    for node in g.node:
        low = is_low(node)
        for i, name in enumerate(node.input):
            if not name or name not in floats:
                continue
            if (node.op_type, i) in FLOAT32_ONLY_INPUTS:
                continue
            src_node = producer.get(name)
            if low:
                if name in inits:
                    node.input[i] = fp16_init(name)
                elif name in graph_inputs or not is_low(src_node):
                    node.input[i] = cast(name, TensorProto.FLOAT16)
                elif name in renamed_outputs:
                    node.input[i] = renamed_outputs[name]
            elif src_node is not None and is_low(src_node):  # a float32 node fed by a float16 one
                node.input[i] = cast(renamed_outputs.get(name, name), TensorProto.FLOAT)
        if low:
            for j, name in enumerate(node.output):
                if name in renamed_outputs:
                    node.output[j] = renamed_outputs[name]
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT:
                        a.i = TensorProto.FLOAT16
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        new_nodes.append(node)
    for out, internal in renamed_outputs.items():
        new_nodes.append(helper.make_node("Cast", [internal], [out], name=f"cast_{out}_out", to=TensorProto.FLOAT))

    # Drop float32 initializers nothing reads any more (all their readers now take the float16 copy).
    used = {name for n in new_nodes for name in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.node[:]
    g.node.extend(_topological(new_nodes, {i.name for i in g.input} | {i.name for i in keep}))
    del g.value_info[:]
    src.doc_string = (src.doc_string + " [fp16: float16 compute, float32 I/O]").strip()
    onnx.checker.check_model(src)
    return onnx.shape_inference.infer_shapes(src, strict_mode=True)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes ordered so each comes after its inputs' producers (the casts were appended out of order)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in ready})
            raise ValueError(f"fp16 conversion left a graph with unresolved inputs {missing[:5]}; this is a bug")
        pending = rest
    return ordered


def is_fp16_graph(model: onnx.ModelProto) -> bool:
    """Whether ``model`` computes in float16 (has float16 initializers or casts to float16)."""
    if any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer):
        return True
    return any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node
    )
