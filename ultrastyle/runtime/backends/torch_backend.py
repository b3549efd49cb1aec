"""The PyTorch runner: the reference every other backend is checked against."""

from __future__ import annotations

import torch

from ultrastyle.models.pretrained import StyleModel
from ultrastyle.runtime.backends.base import Runner, RunnerError, parse_network


class TorchRunner(Runner):
    """Runs a `StyleModel`'s modules eagerly on the model's device."""

    backend = "torch"

    def __init__(self, model: StyleModel, threads: int = 0) -> None:
        super().__init__(model.name, model.arch, model.stages)
        self.model = model
        self.threads = threads
        self._saved_threads = 0

    @property
    def device(self) -> torch.device:
        return self.model.device

    def activate_impl(self) -> None:
        # The modules are already on their device; only the thread count is set here.
        if self.threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)

    def deactivate_impl(self) -> None:
        if self._saved_threads:
            torch.set_num_threads(self._saved_threads)
            self._saved_threads = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def infer_impl(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind, stage = parse_network(network)
        if stage not in self.model.encoders:
            raise RunnerError(f"{self.name} has no stage {stage}; it has {list(self.stages)}")
        if kind == "encoder":
            return {"features": self.model.encode(stage, feed["image"])}
        if kind in ("decoder_affine", "decoder_folded"):
            return {"image": self.model.decode(stage, feed["features"], feed["A"], feed["b"])}
        return {"image": self.model.decoders[stage](feed["features"])}

    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        self._check_active()
        return self.model.encode_core(stage, image, rows, cols)

    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        self._check_active()
        return self.model.decode_core(stage, features, a, b, rows, cols)

    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        self._check_active()
        return self.model.stylize_core(stage, image, a, b, rows, cols)

    def release_memory(self, keep_bytes: int = 0) -> None:
        # PyTorch's CUDA cache: emptied once it holds more than keep_bytes unused (the CPU allocator returns memory itself).
        if self.device.type == "cuda":
            if torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device) > keep_bytes:
                torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
