"""Every exported graph is checked: onnx.checker with full shape inference, then
ONNX Runtime against PyTorch on random and real-looking inputs of several sizes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ultrastyle.export.errors import ExportValidationError
from ultrastyle.export.graph import torch_reference
from ultrastyle.export.spec import ATOL, RTOL, NetworkSpec
from ultrastyle.models.networks import _StageNet


def _feeds(spec: NetworkSpec, grid: int, cells: Iterable[tuple[int, int]], seed: int = 0):
    """Inputs at each size: uniform noise and a smooth 'photo-like' ramp (features from the real encoder)."""
    rng = np.random.default_rng(seed)
    for ch, cw in cells:
        if spec.kind in ("encoder", "encoder_aux"):
            h, w = ch * grid, cw * grid
            noise = rng.random((1, 3, h, w), dtype=np.float32)
            yy, xx = np.meshgrid(np.linspace(0, 1, h, dtype=np.float32), np.linspace(0, 1, w, dtype=np.float32), indexing="ij")
            smooth = np.stack([yy, xx, (yy + xx) / 2])[None]
            yield f"{h}x{w}", {spec.inputs[0].name: noise}
            yield f"{h}x{w} smooth", {spec.inputs[0].name: smooth.astype(np.float32)}
        else:
            c = spec.inputs[0].shape[1]
            # relu{k}_1 features are non-negative with a heavy tail
            f = (rng.standard_exponential((1, c, ch, cw)) * 2).astype(np.float32)
            feed = {spec.inputs[0].name: f}
            if spec.kind in ("decoder_affine", "decoder_folded"):
                a = np.eye(c, dtype=np.float32) * 0.6 + rng.standard_normal((c, c)).astype(np.float32) * (0.4 / np.sqrt(c))
                feed["A"], feed["b"] = a.astype(np.float32), (rng.standard_normal(c) * 0.1).astype(np.float32)
            yield f"{ch}x{cw} features", feed


def validate_network(
    path: Path, net: _StageNet, spec: NetworkSpec, grid: int, cells: Iterable[tuple[int, int]], dtype: str = "float32"
) -> dict:
    """Check ``path`` against ``net``; returns {"max_abs_diff", "atol", "sizes"}; raises ExportValidationError."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportValidationError(spec.name, f"invalid ONNX graph {path}: {exc}") from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    atol, rtol = ATOL[dtype][spec.kind], RTOL[dtype]
    worst, sizes = 0.0, []
    names = [t.name for t in spec.outputs]
    for label, feed in _feeds(spec, grid, cells):
        refs = torch_reference(net, spec, feed)
        for name, got in zip(names, session.run(names, feed)):
            ref = refs[name]
            if got.shape != ref.shape:
                raise ExportValidationError(spec.name, f"{label}: ONNX Runtime gave {name} of shape {got.shape}, PyTorch {ref.shape}")
            diff = float(np.abs(got - ref).max())
            worst = max(worst, diff)
            if (np.abs(got - ref) - rtol * np.abs(ref)).max() > atol:
                raise ExportValidationError(
                    spec.name,
                    f"{label}: ONNX Runtime's {name} differs from PyTorch by up to {diff:.3g} (allowed {atol:g} + {rtol:g}*|ref|)",
                    diff, atol,
                )  # fmt: skip
        sizes.append(label)
    return {"max_abs_diff": worst, "atol": atol, "rtol": rtol, "sizes": sizes}
