"""The pass-1 statistics as an ONNX graph, so a GPU backend reduces them where the features are.

``stats_c{C}`` takes relu{k}_1 features (1, C, h, w) and a core window given as
two 0/1 masks, ``row_mask`` (h,) and ``col_mask`` (w,), and returns

- ``sum``   (C,):   Σ f over the window,
- ``outer`` (C, C): Σ (f - μ)(f - μ)ᵀ over the window, μ = sum / count,
- ``count`` (1,):   the number of window pixels.

Only C + C² + 1 numbers leave the device per tile. The outer product is
*centred on the tile's own mean*: a raw Σffᵀ in float32 (TensorRT has no
float64) loses the covariance to cancellation when the mean is large next to
the spread; centred, the host restores Σffᵀ = outer + n μμᵀ in float64
(`stats_from_outputs`), exactly up to rounding.

Masks instead of a Slice keep every shape static for TensorRT: a Slice whose
bounds are graph inputs would make them shape tensors, which need host
buffers and profile values of their own. The graph has no weights: it depends
on C alone, so ``build`` generates it for each feature width rather than
storing it in the bundle. ``tests/test_trt_units.py`` checks it against
`FeatureStats.of` under ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ultrastyle.core.transforms import FeatureStats

STATS_OUTPUTS = ("sum", "outer", "count")


def stats_network_name(channels: int) -> str:
    return f"stats_c{channels}"


def build_stats_graph(channels: int, *, opset: int = 17) -> onnx.ModelProto:
    """The statistics graph for ``channels``-wide features (every op on TensorRT's supported list)."""
    if opset < 13:
        raise ValueError(f"the statistics graph needs opset >= 13 (ReduceSum with an axes input), got {opset}")
    c = channels
    inits = [
        numpy_helper.from_array(np.array([c, -1], np.int64), "shape_c_p"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "shape_col"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape_row"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([c], np.int64), "shape_c"),
        numpy_helper.from_array(np.array([1], np.int64), "shape_1"),
        numpy_helper.from_array(np.array([0, 1], np.int64), "axes01"),
        numpy_helper.from_array(np.array([1.0], np.float32), "one"),
    ]
    n = helper.make_node
    nodes = [
        n("Reshape", ["features", "shape_c_p"], ["f"], name="flatten"),  # (C, P), P = h*w
        n("Reshape", ["row_mask", "shape_col"], ["rm"], name="rows"),  # (h, 1)
        n("Reshape", ["col_mask", "shape_row"], ["cm"], name="cols"),  # (1, w)
        n("Mul", ["rm", "cm"], ["mask2d"], name="window"),  # (h, w)
        n("Reshape", ["mask2d", "shape_row"], ["m"], name="mask_flat"),  # (1, P)
        n("ReduceSum", ["m", "axes01"], ["n11"], name="count_sum", keepdims=1),  # (1, 1)
        n("Max", ["n11", "one"], ["n_safe"], name="count_floor"),  # an empty window gives zeros, not NaN
        n("Mul", ["f", "m"], ["fm"], name="masked"),
        n("ReduceSum", ["fm", "axis1"], ["s"], name="sum_f", keepdims=1),  # (C, 1)
        n("Div", ["s", "n_safe"], ["mu"], name="mean"),
        n("Sub", ["f", "mu"], ["fc"], name="centre"),
        n("Mul", ["fc", "m"], ["fcm"], name="centre_masked"),
        n("Transpose", ["fcm"], ["fcm_t"], name="centre_t", perm=[1, 0]),
        n("MatMul", ["fcm", "fcm_t"], ["outer"], name="outer_centred"),  # (C, C)
        n("Reshape", ["s", "shape_c"], ["sum"], name="sum_flat"),
        n("Reshape", ["n11", "shape_1"], ["count"], name="count_flat"),
    ]
    graph = helper.make_graph(
        nodes,
        stats_network_name(c),
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, c, "h", "w"]),
            helper.make_tensor_value_info("row_mask", TensorProto.FLOAT, ["h"]),
            helper.make_tensor_value_info("col_mask", TensorProto.FLOAT, ["w"]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, [c]),
            helper.make_tensor_value_info("outer", TensorProto.FLOAT, [c, c]),
            helper.make_tensor_value_info("count", TensorProto.FLOAT, [1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ultrastyle")
    model.ir_version = min(model.ir_version, 9)  # as export.graph: readable by ONNX Runtime >= 1.16 and TensorRT 10
    model.doc_string = f"ultrastyle pass-1 statistics over a masked window, {c} channels"
    return model


def window_masks(h: int, w: int, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """0/1 float32 masks (h,), (w,) selecting ``rows`` x ``cols`` of an (h, w) feature map."""
    rm = np.zeros(h, np.float32)
    cm = np.zeros(w, np.float32)
    rm[rows] = 1.0
    cm[cols] = 1.0
    return rm, cm


def stats_from_outputs(sum_: np.ndarray, outer_centred: np.ndarray, count: float) -> FeatureStats:
    """FeatureStats (float64) from the graph's outputs: Σffᵀ = Σ(f-μ)(f-μ)ᵀ + n μμᵀ."""
    n = int(round(float(np.asarray(count).reshape(-1)[0])))
    s = torch.from_numpy(np.asarray(sum_, np.float64).reshape(-1).copy())
    outer = torch.from_numpy(np.asarray(outer_centred, np.float64).copy())
    if n > 0:
        mu = s / n
        outer = outer + n * torch.outer(mu, mu)
    return FeatureStats(n, s, outer)
