"""L-BFGS and Adam over image-sized vectors held in canvases (`optimization.vectors`).

Both minimise an `Objective`: ``value(x)`` (the loss alone: pass 1 of the
tiled evaluation) and ``gradient(x, g)`` (loss and gradient: both passes).
Their state is a few canvases plus scalars, saved and restored exactly
(`Solver.save` / `Solver.load`), so a resumed run continues bit for bit.

- `LBFGS` (Nocedal & Wright, Numerical Optimization, algorithm 7.4): the
  two-loop recursion over the last ``history`` pairs (s, y), H0 = γ I with
  γ = sᵀy / yᵀy, and a backtracking Armijo line search whose trial points
  cost pass 1 only: the accepted point's pass 1 is reused for its gradient.
  Canvases: the image, the trial image, two gradients, the direction and
  2 x ``history`` pairs.
- `Adam` (Kingma & Ba 2015): first and second moments, bias-corrected.
  Canvases: the image, the gradient and the two moments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ultrastyle.core.canvas import Canvas, CanvasSite
from ultrastyle.optimization.constants import SOLVERS
import ultrastyle.optimization.vectors as vec
from ultrastyle.optimization.loss import LossValue

DEFAULT_HISTORY = 5
DEFAULT_INITIAL_STEP = 0.05  # L-BFGS's first step: at most this much change of any pixel (images in [0, 1])
DEFAULT_ADAM_LR = 0.01


class Objective(Protocol):
    def value(self, x: Canvas) -> LossValue: ...

    def gradient(self, x: Canvas, g: Canvas, known: LossValue | None = None) -> LossValue: ...


def _value_dict(v: LossValue | None) -> dict | None:
    return None if v is None else {"total": v.total, "content": v.content, "style": v.style}


def _value_from(d: dict | None) -> LossValue | None:
    return None if d is None else LossValue(float(d["total"]), float(d["content"]), {k: float(x) for k, x in d["style"].items()})


class Solver:
    """Common parts: the image ``x`` (owned: closed with the solver), the vectors' site, saving."""

    name = ""

    def __init__(self, x: Canvas, site: CanvasSite) -> None:
        self.x, self.site = x, site
        self.iterations = 0
        self.value: LossValue | None = None  # the loss at the last evaluated point

    def _new(self) -> Canvas:
        return Canvas.at(self.site, *self.x.shape)

    def step(self, objective: Objective) -> LossValue:
        raise NotImplementedError

    def _scalars(self) -> dict:
        return {}

    def _vectors(self) -> dict[str, Canvas]:
        return {"x": self.x}

    def _restore(self, scalars: dict, folder: Path) -> None:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Scalars to ``solver.json`` and every state vector to ``NAME.npy`` in ``folder`` (which exists, empty)."""
        for name, canvas in self._vectors().items():
            vec.save(canvas, folder / f"{name}.npy")
        meta = {"solver": self.name, "iterations": self.iterations, "value": _value_dict(self.value), **self._scalars()}
        (folder / "solver.json").write_text(json.dumps(meta), encoding="utf-8")

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote; ValueError when it is another solver's state."""
        meta = json.loads((folder / "solver.json").read_text(encoding="utf-8"))
        if meta.get("solver") != self.name:
            raise ValueError(f"{folder}: holds {meta.get('solver')!r} state, not {self.name!r}")
        vec.load(folder / "x.npy", self.x)
        self.iterations = int(meta["iterations"])
        self.value = _value_from(meta["value"])
        self._restore(meta, folder)

    def close(self) -> None:
        for canvas in self._canvases():
            canvas.close()

    def _canvases(self) -> list[Canvas]:
        return [self.x]


class Adam(Solver):
    """Adam with its moments in canvases; ``lr`` in image units (pixels in [0, 1])."""

    name = "adam"

    def __init__(
        self, x: Canvas, site: CanvasSite = CanvasSite(), lr: float = DEFAULT_ADAM_LR,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
    ) -> None:  # fmt: skip
        super().__init__(x, site)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.g, self.m, self.v = self._new(), self._new(), self._new()

    def step(self, objective: Objective) -> LossValue:
        """Loss and gradient at x, then one update of x; returns the loss at x before the update."""
        value = objective.gradient(self.x, self.g)
        self.iterations += 1
        b1, b2 = self.betas
        vec.apply(self.m, [self.m, self.g], lambda m, g: b1 * m + (1 - b1) * g)
        vec.apply(self.v, [self.v, self.g], lambda v, g: b2 * v + (1 - b2) * g * g)
        c1, c2 = 1 - b1**self.iterations, 1 - b2**self.iterations
        lr, eps = self.lr, self.eps
        vec.apply(self.x, [self.x, self.m, self.v], lambda x, m, v: x - lr * (m / c1) / (np.sqrt(v / c2) + eps))
        self.value = value
        return value

    def _vectors(self) -> dict[str, Canvas]:
        return {"x": self.x, "m": self.m, "v": self.v}

    def _restore(self, scalars: dict, folder: Path) -> None:
        vec.load(folder / "m.npy", self.m)
        vec.load(folder / "v.npy", self.v)

    def _canvases(self) -> list[Canvas]:
        return [self.x, self.g, self.m, self.v]


class LBFGS(Solver):
    """Limited-memory BFGS with a backtracking Armijo line search; all vectors in canvases."""

    name = "lbfgs"

    def __init__(
        self, x: Canvas, site: CanvasSite = CanvasSite(), history: int = DEFAULT_HISTORY,
        initial_step: float = DEFAULT_INITIAL_STEP, c1: float = 1e-4, max_backtracks: int = 8,
    ) -> None:  # fmt: skip
        super().__init__(x, site)
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.m, self.initial_step, self.c1, self.max_backtracks = history, initial_step, c1, max_backtracks
        self.g, self.g_new, self.x_new, self.d = self._new(), self._new(), self._new(), self._new()
        self.pairs: list[tuple[Canvas, Canvas, float]] = []  # (s, y, 1 / yᵀs), oldest first
        self.gamma = 1.0
        self.have_gradient = False
        self.evaluations = 0

    def _direction(self) -> None:
        """``d = −H g`` by the two-loop recursion."""
        vec.combine(self.d, [(-1.0, self.g)])
        alphas = []
        for s, y, rho in reversed(self.pairs):
            a = rho * vec.dot(s, self.d)
            alphas.append(a)
            vec.combine(self.d, [(1.0, self.d), (-a, y)])
        if self.pairs:
            vec.combine(self.d, [(self.gamma, self.d)])
        for (s, y, rho), a in zip(self.pairs, reversed(alphas)):
            b = rho * vec.dot(y, self.d)
            vec.combine(self.d, [(1.0, self.d), (a - b, s)])

    def _reset(self) -> None:
        for s, y, _ in self.pairs:
            s.close()
            y.close()
        self.pairs = []
        self.gamma = 1.0

    def step(self, objective: Objective) -> LossValue:
        """One iteration: direction, line search, gradient at the accepted point; returns the loss there."""
        if not self.have_gradient:
            self.value = objective.gradient(self.x, self.g)
            self.evaluations += 1
            self.have_gradient = True
        assert self.value is not None
        f = self.value.total
        self._direction()
        gtd = vec.dot(self.g, self.d)
        if not gtd < 0:  # not a descent direction (rounding on a flat stretch): start again from the gradient
            self._reset()
            self._direction()
            gtd = vec.dot(self.g, self.d)
        t = 1.0 if self.pairs else self.initial_step / max(vec.max_abs(self.d), 1e-30)
        trial = None
        for _ in range(self.max_backtracks + 1):
            vec.combine(self.x_new, [(1.0, self.x), (t, self.d)])
            trial = objective.value(self.x_new)
            self.evaluations += 1
            if trial.total <= f + self.c1 * t * gtd:
                break
            curvature = trial.total - f - gtd * t  # quadratic through f, f'(0) and the trial
            t_next = -gtd * t * t / (2 * curvature) if curvature > 0 else 0.5 * t
            t = min(max(t_next, 0.1 * t), 0.5 * t)
        assert trial is not None
        if trial.total > f:  # the search failed: keep x, forget the curvature pairs
            self._reset()
            self.iterations += 1
            return self.value
        new = objective.gradient(self.x_new, self.g_new, known=trial)
        vec.combine(self.d, [(t, self.d)])  # s = x_new − x
        vec.combine(self.g, [(1.0, self.g_new), (-1.0, self.g)])  # y = g_new − g, in the old gradient's canvas
        ys, yy = vec.dot(self.g, self.d), vec.dot(self.g, self.g)
        self.x, self.x_new = self.x_new, self.x
        y, self.g = self.g, self.g_new
        if ys > 1e-10 * yy and yy > 0:  # positive curvature: keep the pair
            self.pairs.append((self.d, y, 1.0 / ys))
            self.gamma = ys / yy
            if len(self.pairs) > self.m:
                s_old, y_old, _ = self.pairs.pop(0)
                self.d, self.g_new = s_old, y_old
            else:
                self.d, self.g_new = self._new(), self._new()
        else:
            self.g_new = y
        self.value = new
        self.iterations += 1
        return new

    def _scalars(self) -> dict:
        return {
            "rhos": [rho for _, _, rho in self.pairs], "gamma": self.gamma, "have_gradient": self.have_gradient,
            "evaluations": self.evaluations,
        }  # fmt: skip

    def _vectors(self) -> dict[str, Canvas]:
        out = {"x": self.x}
        if self.have_gradient:
            out["g"] = self.g
        for i, (s, y, _) in enumerate(self.pairs):
            out[f"s{i}"], out[f"y{i}"] = s, y
        return out

    def _restore(self, scalars: dict, folder: Path) -> None:
        self._reset()
        self.gamma = float(scalars["gamma"])
        self.have_gradient = bool(scalars["have_gradient"])
        self.evaluations = int(scalars["evaluations"])
        if self.have_gradient:
            vec.load(folder / "g.npy", self.g)
        for i, rho in enumerate(scalars["rhos"]):
            s, y = self._new(), self._new()
            vec.load(folder / f"s{i}.npy", s)
            vec.load(folder / f"y{i}.npy", y)
            self.pairs.append((s, y, float(rho)))

    def _canvases(self) -> list[Canvas]:
        return [self.x, self.x_new, self.g, self.g_new, self.d] + [c for s, y, _ in self.pairs for c in (s, y)]


def make_solver(name: str, x: Canvas, site: CanvasSite = CanvasSite(), **settings: float) -> Solver:
    """``"lbfgs"`` or ``"adam"`` over the image ``x``; ``settings``: the solver's keywords (history, lr, ...)."""
    if name == "lbfgs":
        return LBFGS(x, site, **settings)  # type: ignore[arg-type]
    if name == "adam":
        return Adam(x, site, **settings)  # type: ignore[arg-type]
    raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {name!r}")


def vectors_per_image(name: str, history: int = DEFAULT_HISTORY) -> int:
    """Image-sized float32 vectors a solver holds at most (for the budget)."""
    return 5 + 2 * history if name == "lbfgs" else 4
