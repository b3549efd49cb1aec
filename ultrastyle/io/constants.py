"""Image I/O settings the command line shows in its help: torch-free, so ``ultrastyle --help`` stays cheap.

`io.images` (which imports torch) re-exports them; this is their one definition.
"""

from __future__ import annotations

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
# Ultra-resolution is the point of this toolkit: PIL's decompression-bomb guard
# (89 MP) is raised deliberately, to this default, and can be set per call.
DEFAULT_MAX_PIXELS = 400_000_000
# Styles are resized to this long side unless told: their statistics barely change above it, and it bounds their cost.
DEFAULT_STYLE_SIZE = 1024
# zlib level of PNG outputs: level 1 (with libpng's fast filter) is ~10x faster to write than level 6,
# files 21% larger (benchmarks/codecs.py measures the levels and encoders).
DEFAULT_PNG_LEVEL = 1
# What an output can be written as: `io.images`' file formats, and Deep Zoom's folder of tiles (`io.pyramid`).
OUTPUT_FORMATS = ("png", "jpg", "tiff", "dzi")


def format_name(text: str) -> str:
    """An output format as `io.pyramid.OUTPUT_FORMATS` spells it: ``"JPEG"`` -> ``"jpg"``, ``"tif"`` -> ``"tiff"`` (others lower-cased)."""
    return {"jpeg": "jpg", "tif": "tiff"}.get(text.lower(), text.lower())
