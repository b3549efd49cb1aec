"""Defaults of an optimization run that the command line shows in its help: torch-free, so ``ultrastyle --help`` stays cheap.

`optimization.loss` and `optimization.run` (which import torch) re-export them; this is their one definition.
"""

from __future__ import annotations

from ultrastyle.core.tile_memory import DEFAULT_BUDGET

DEFAULT_CONTENT_LAYER = "relu4_1"
DEFAULT_CONTENT_WEIGHT = 1.0
DEFAULT_STYLE_WEIGHT = 1e-3  # balances the two terms on the CD 16x encoder: see docs/optimize.md
DEFAULT_ITERATIONS = 100
DEFAULT_SAVE_EVERY = 10  # iterations between saves of a run's state (where it has a state folder): a crash loses at most these
DEFAULT_MAX_MEMORY = DEFAULT_BUDGET
SOLVERS = ("lbfgs", "adam")
DEFAULT_SOLVER = "lbfgs"  # measured against Adam: docs/optimize.md
FORMATS = ("png", "jpg", "tiff")  # what optimize writes (no Deep Zoom pyramid: the output is one image in memory)
