"""Optimization-based stylization (Gatys et al.) with a compressed encoder as the loss network, exact at any size.

``ultrastyle.optimize(content, style, ...)`` runs it (`run.optimize`). Parts: `loss` (the
loss network and the exact tiled gradient), `solvers` (L-BFGS and Adam with
their state in canvases), `vectors` (band-wise arithmetic on canvases), `run`
(scales, initialisation, memory, resumable state).
"""

from __future__ import annotations

from ultrastyle.optimization.run import Optimizer, OptimizeOptions, ProgressEvent, make_optimize_options, optimize

__all__ = ["Optimizer", "OptimizeOptions", "ProgressEvent", "make_optimize_options", "optimize"]
