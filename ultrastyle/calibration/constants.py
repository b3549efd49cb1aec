"""Calibration settings the command line shows in its help: torch- and onnx-free, so ``ultrastyle --help`` stays cheap.

`calibration.data` and `calibration.quantize` re-export them (what each
setting does is described there); this is their one definition.
"""

from __future__ import annotations

DEFAULT_TILE = 512
MIN_TILE = 32  # 2 x the deepest stage's grid (16): the smallest side every stage can take
DEFAULT_SAMPLES = 8
# Long side the images are brought to before tiles are cut: close to the
# scale of a stage's input in a real run, where tiles cut a large photo.
DEFAULT_IMAGE_SIZE = 1024
MIN_IMAGE_SIZE = 64

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "percentile"  # measured: +2 dB over minmax on the 5-stage cascade (benchmarks/int8_quality.py)
KEEP_FLOAT = ("transform", "ends", "deep")
DEFAULT_KEEP_FLOAT = "ends"
ACTIVATIONS = ("uint8", "int8")
DEFAULT_ACTIVATIONS = "uint8"  # measured: +2.8-3.5 dB over signed int8 on the 5-stage cascade, at about the same speed
# Range kept by the percentile method; measured: 99.9 / 99.97 / 99.99 / 99.999 / 99.9999 -> 25.3 / 27.6 / 28.3 / 28.2 / 27.2 dB (uint8)
DEFAULT_PERCENTILE = 99.99
