"""The runner interface every backend implements (after Polygraphy's runners).

A runner owns a model's stage networks on one device: ``activate`` loads them,
``infer`` runs one network by name (``encoder3``, ``decoder3``,
``decoder_affine3``) on a feed dict, ``deactivate`` frees them; a runner is a
context manager. The stylization pipeline uses the two calls built on
``infer``: ``encode`` (image tile -> relu{k}_1 features) and ``decode``
(features, A, b -> image tile), with torch tensors on ``device`` in and out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from ultrastyle.core.arch import ArchSpec
from ultrastyle.core.traits import EAGER_DEVICE, EAGER_HOST, RunnerTraits
from ultrastyle.core.transforms import FeatureStats
from ultrastyle.errors import RunnerError


@runtime_checkable
class StageNetworks(Protocol):
    """What the cascade and the tiled pipeline need from a model."""

    name: str
    arch: ArchSpec

    @property
    def device(self) -> torch.device: ...

    @property
    def stages(self) -> tuple[int, ...]: ...

    def encode(self, stage: int, image: torch.Tensor) -> torch.Tensor: ...

    def decode(self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...

    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor: ...

    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor: ...

    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor: ...


class Runner(ABC):
    """Base class: state checks and the context-manager protocol; backends fill in the ``*_impl`` parts."""

    backend = "abstract"

    def __init__(self, name: str, arch: ArchSpec, stages: tuple[int, ...]) -> None:
        self.name, self.arch, self._stages = name, arch, tuple(stages)
        self.is_active = False

    @property
    def stages(self) -> tuple[int, ...]:
        return self._stages

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where ``encode``/``decode`` want their tensors."""

    def activate(self) -> Runner:
        if self.is_active:
            raise RunnerError(f"{self.backend} runner for {self.name} is already active; activate it once (one `with runner:` block) and deactivate before activating again")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if not self.is_active:
            raise RunnerError(f"{self.backend} runner for {self.name} is not active; use it inside `with runner:` (or call activate() first)")
        self.deactivate_impl()
        self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def infer(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run ``network`` on ``feed`` (input name -> tensor); returns output name -> tensor."""
        self._check_active()
        return self.infer_impl(network, feed)

    def _check_active(self) -> None:
        if not self.is_active:
            raise RunnerError(f"{self.backend} runner for {self.name}: call activate() (or use `with`) before infer()")

    def encode(self, stage: int, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, H/g, W/g)."""
        return self.infer(f"encoder{stage}", {"image": image})["features"]

    def decode(self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w), A (C, C), b (C,) -> (N, 3, h*g, w*g): decoder(A f + b)."""
        return self.infer(f"decoder_affine{stage}", {"features": features, "A": a, "b": b})["image"]

    # A tile's core only. Whole graphs run here, then the core is cut out;
    # a backend that can skip the halo work overrides these.

    def encode_core(self, stage: int, image: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        return self.encode(stage, image)[..., rows, cols]

    def decode_core(
        self, stage: int, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        return self.decode(stage, features, a, b)[..., rows, cols]

    def stylize_core(
        self, stage: int, image: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: slice, cols: slice
    ) -> torch.Tensor:
        return self.decode(stage, self.encode(stage, image), a, b)[..., rows, cols]

    def encode_core_statistics(
        self, stage: int, image: torch.Tensor, rows: slice, cols: slice, keep_features: bool
    ) -> tuple[FeatureStats, torch.Tensor | None]:
        """Pass 1 of the tiled pipeline for one tile: statistics of the core features (and the features if kept).

        Σf and Σffᵀ are reduced where the features are and may stay there
        (`FeatureStats.to_host` brings them over): the tiled pass adds up its
        tiles on the device and copies C + C² numbers once, so the host does
        not wait for each tile's compute (mask regions' per-region statistics
        still come over per tile). A backend whose features are not tensors
        on a device (TensorRT) overrides this.
        """
        core = self.encode_core(stage, image, rows, cols)
        return FeatureStats.of(core, host=False), (core if keep_features else None)

    def release_memory(self, keep_bytes: int = 0) -> None:
        """Give memory cached for past tile shapes back (called after tiles and between passes); no-op by default.

        ``keep_bytes``: a backend may keep up to this much cached memory, since
        giving it back and faulting it in again costs time.
        """

    def memory_bytes(self) -> int:
        """Memory the runner holds on its device (best effort; 0 when unknown)."""
        return 0

    @property
    def traits(self) -> RunnerTraits:
        """What the tile planner needs to know about this runner (`core.traits.RunnerTraits`).

        The base: eager PyTorch as the planner models it, the budget where the tensors live.
        """
        return EAGER_HOST if self.device.type == "cpu" else EAGER_DEVICE

    def memory_factor(self, stage: int) -> float:
        """This backend's peak tile memory over the planner's model (eager PyTorch on oneDNN), measured (`traits`)."""
        return self.traits.memory_factor(stage)

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, network: str, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def bundle_stages(bundle: Any, stages: Iterable[int] | None) -> tuple[int, ...]:
    """``stages`` of a bundle (None: all it has); RunnerError naming the stages it has where it lacks one."""
    if stages is None:
        return tuple(bundle.stages)
    if why := bundle.stages_problem(stages):
        raise RunnerError(f"{why}; choose levels among {','.join(map(str, sorted(bundle.stages, reverse=True)))}")
    return tuple(stages)


def runner_traits(model: StageNetworks) -> RunnerTraits:
    """A runner's `Runner.traits`; a bare `StyleModel`'s: eager PyTorch where its tensors live (`EAGER_HOST`, `EAGER_DEVICE`)."""
    if isinstance(model, Runner):
        return model.traits
    return EAGER_HOST if model.device.type == "cpu" else EAGER_DEVICE


def parse_network(name: str) -> tuple[str, int]:
    """``"decoder_affine3"`` -> ("decoder_affine", 3)."""
    kind, stage = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")) :]
    if kind not in ("encoder", "decoder", "decoder_affine", "decoder_folded") or not stage.isdigit():
        raise RunnerError(f"unknown network {name!r}; expected encoderK, decoderK, decoder_affineK or decoder_foldedK")
    return kind, int(stage)
