"""The export's error that the run path names too, kept free of onnx and torch (importing onnx costs ~0.8 s)."""

from __future__ import annotations


class ExportValidationError(RuntimeError):
    """An exported graph that disagrees with its PyTorch module (or is not valid ONNX)."""

    def __init__(self, network: str, detail: str, max_diff: float | None = None, atol: float | None = None) -> None:
        self.network, self.max_diff, self.atol = network, max_diff, atol
        super().__init__(f"{network}: {detail}")


__all__ = ["ExportValidationError"]
