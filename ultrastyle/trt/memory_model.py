"""Device memory of a TensorRT tile, per precision: the planner's factor for the TensorRT runner.

The planner (`core.tile_memory`) models eager PyTorch on oneDNN, which keeps
padded and blocked copies of every convolution's input alive. A TensorRT
engine plans its activation memory ahead and reuses it: the peak is about the
largest (input + output) pair of one layer, in the engine's compute type,
plus the float32 input/output buffers the runner binds. `trt_bytes_per_pixel`
models that; `memory_factor` is its ratio to the planner's model, which is
what the runner's traits report (`RunnerTraits.memory_factor`), so a budget
picks TensorRT tiles through the same `plan_stage`.

This is a model, not a measurement (no GPU was available when it was
written): `TRT_SAFETY` leaves room for convolution workspace and tactic
scratch. Replace it with measured factors (as the ONNX Runtime runner has)
once ``benchmarks/tensorrt_throughput.py`` has run on a GPU.
"""

from __future__ import annotations

from ultrastyle.core.arch import ArchSpec, Layer
from ultrastyle.core.tile_memory import stage_bytes_per_pixel

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8": 1}
TRT_SAFETY = 1.5  # workspace, tactic scratch and alignment on top of the activation peak


def _peak_pair(layers: list[Layer], channels: int, scale: float, bpv: float) -> tuple[float, int, float]:
    """Largest input + output bytes of one layer, per input pixel; returns (peak, out channels, out scale)."""
    peak = 0.0
    for layer in layers:
        area_in = 1.0 / (scale * scale)
        cout = layer.cout if layer.kind == "conv" else channels
        if layer.kind == "pool":
            scale *= 2
        elif layer.kind == "up":
            scale /= 2
        area_out = 1.0 / (scale * scale)
        peak = max(peak, (channels * area_in + cout * area_out) * bpv)
        channels = cout
    return peak, channels, scale


def trt_bytes_per_pixel(spec: ArchSpec, stage: int, precision: str = "fp32") -> float:
    """Device bytes per pixel of the tile region for encoder k -> A f + b -> decoder k on TensorRT."""
    bpv = float(BYTES_PER_VALUE[precision])
    # INT8 engines keep float tensors at the Q/DQ borders (the transform, first and last layers): count 2 bytes.
    bpv = max(bpv, 2.0) if precision == "int8" else bpv
    enc, c, s = _peak_pair(spec.encoder_layers(stage), 3, 1.0, bpv)
    dec, _, _ = _peak_pair(spec.decoder_layers(stage), c, s, bpv)
    io = (3 + 3 + 2 * c / (s * s)) * 4  # float32 image in and out, features between the engines (and their copy)
    return max(enc, dec) * TRT_SAFETY + io


def memory_factor(spec: ArchSpec, stage: int, precision: str = "fp32") -> float:
    """TensorRT's modelled bytes per pixel over the planner's (eager PyTorch fp32) model."""
    return trt_bytes_per_pixel(spec, stage, precision) / stage_bytes_per_pixel(spec, stage)
