"""What the tile planner needs to know about a runner, as one value.

Every runner has a `traits` property (`runtime.backends.base.Runner`); a
bare `StyleModel` is planned with `EAGER_HOST` or `EAGER_DEVICE`. Tile plans
are a function of the image size, the `TilingOptions` and these traits alone
(`core.plan`), so they do not change with any process-wide state: what can
change (the heap's retention, `runtime.memory.heap_factor`; the engines a
TensorRT bundle has) is read when the traits are made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BUDGET_MEMORIES = ("host", "device")


def _pairs(value: Mapping[int, float] | tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    return tuple(sorted(dict(value).items()))


@dataclass(frozen=True)
class RunnerTraits:
    """A runner's tiling traits (pixels and bytes).

    ``memory_factors`` and ``max_regions`` may be given as dicts (stage ->
    value); they are kept as sorted ``(stage, value)`` pairs, so traits are
    hashable and compare by value.
    """

    # What the memory budget (`TilingOptions.max_memory`) bounds: "host" (this process's RAM: tiles and
    # RAM canvases) or "device" (GPU memory: tiles, and canvases that fit beside them).
    budget_memory: str = "host"
    # Whether every tile of a pass gets one shape (`core.tiling`, uniform): worth its extra border
    # compute where the backend caches memory or plans per input shape.
    uniform_tiles: bool = False
    # True: regions are limited per side (engine profiles), so no whole wide image (`TilingOptions.whole_if_area_fits`).
    bounded_regions: bool = False
    # Per stage, the largest region side (image px) the runner accepts (TensorRT: its engines' profile max).
    max_regions: tuple[tuple[int, int], ...] = ()
    # Share of the memory budget the runner and the C heap may keep between tiles before the tiled
    # pipeline hands it back (`ImagePlan.keep_bytes`): keeping more faults less, costs RSS.
    # Measured at 40 MP, 1 GB budget, eager PyTorch: 3/4 -> 3.68 s/MP, 1.73 GiB; all -> 3.54, 2.24 GiB.
    cache_share: float = 0.75
    # The backend's peak tile memory over the planner's model (eager PyTorch on oneDNN, `core.tile_memory`),
    # measured: per stage, else ``default_memory_factor``.
    memory_factors: tuple[tuple[int, float], ...] = ()
    default_memory_factor: float = 1.0
    # Whether host canvases' tile reads and writes run on worker threads beside the compute
    # (`runtime.tile_io`): where a GPU computes. On the CPU they would share its cores and hold a
    # tile beyond the planner's memory model.
    overlap_io: bool = False
    # Whether a network's output stays valid after the runner's next call. False: CUDA-graph replays
    # reuse their output buffers, so no tile may be written behind (`TilingOptions.resolve` refuses it).
    stable_outputs: bool = True

    def __post_init__(self) -> None:
        if self.budget_memory not in BUDGET_MEMORIES:
            raise ValueError(f"budget_memory must be 'host' or 'device', got {self.budget_memory!r}")
        object.__setattr__(self, "max_regions", tuple((k, int(v)) for k, v in _pairs(self.max_regions)))
        object.__setattr__(self, "memory_factors", tuple((k, float(v)) for k, v in _pairs(self.memory_factors)))

    def memory_factor(self, stage: int) -> float:
        """Peak tile memory of ``stage`` over the planner's model."""
        return dict(self.memory_factors).get(stage, self.default_memory_factor)

    def max_region(self, stage: int) -> int | None:
        """The largest region side (image px) of ``stage`` the runner accepts; None: no limit."""
        return dict(self.max_regions).get(stage)


# A bare StyleModel: eager PyTorch as the planner models it, clipped regions, mixed tile shapes, and the
# budget where its tensors live. (A `TorchRunner` adds what the heap keeps, read when it is made.)
EAGER_HOST = RunnerTraits()
EAGER_DEVICE = RunnerTraits(budget_memory="device", overlap_io=True)
