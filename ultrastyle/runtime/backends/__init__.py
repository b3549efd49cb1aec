"""Backends behind one runner interface: torch (the reference), onnxruntime and tensorrt (`select.open_runner` picks one)."""

from ultrastyle.runtime.backends.base import Runner, StageNetworks

__all__ = ["Runner", "StageNetworks"]
