"""Backends behind one runner interface: torch (the reference), onnxruntime, and later tensorrt."""

from ultrastyle.runtime.backends.base import Runner, StageNetworks

__all__ = ["Runner", "StageNetworks"]
