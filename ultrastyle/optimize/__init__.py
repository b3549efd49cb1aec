"""Optimization-based stylization (Gatys et al.) with a compressed encoder as the loss network, exact at any size.

``ultrastyle.optimize(content, style, ...)`` runs it (`run.optimize`); this
package is callable too, so ``ultrastyle.optimize(...)`` works whether or not
``ultrastyle.optimize`` was imported as a package first. Parts: `loss` (the
loss network and the exact tiled gradient), `solvers` (L-BFGS and Adam with
their state in canvases), `vectors` (band-wise arithmetic on canvases), `run`
(scales, initialisation, memory, resumable state).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ultrastyle.optimize.run import Optimizer, OptimizeOptions, ProgressEvent, make_optimize_options, optimize

__all__ = ["Optimizer", "OptimizeOptions", "ProgressEvent", "make_optimize_options", "optimize"]


class _CallableModule(types.ModuleType):
    """``ultrastyle.optimize`` is both this package and the function: after ``import ultrastyle.optimize`` the
    package attribute is the module, and calling it must still run `optimize`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
