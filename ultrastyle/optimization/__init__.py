"""Optimization-based stylization (Gatys et al.) with a compressed encoder as the loss network, exact at any size.

``ultrastyle.optimize(content, style, ...)`` runs it (`run.optimize`). Parts: `loss` (the
loss network and the exact tiled gradient), `solvers` (L-BFGS and Adam with
their state in canvases), `vectors` (band-wise arithmetic on canvases), `run`
(scales, initialisation, memory, resumable state).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Optimizer", "OptimizeOptions", "ProgressEvent", "StateWarning", "make_optimize_options", "optimize"]


def __getattr__(name: str) -> Any:
    # The names of `run` are loaded on first use, so the torch-free `constants` (the command line's help) stays cheap.
    if name in __all__:
        value = getattr(importlib.import_module("ultrastyle.optimization.run"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ultrastyle.optimization' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
