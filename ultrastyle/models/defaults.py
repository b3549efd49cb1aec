"""A model's default transform settings: method, levels, alpha (like timm's "default config").

`ModelDefaults` holds them; `defaults_from_dict` validates the ``"defaults"``
mapping that ``zoo.json`` entries, bundle manifests and a model folder's
``architecture.json`` may carry::

    {"method": "adain", "levels": [4], "alpha": 1.0}

Every key is optional; a missing one takes the base value: method ``wct``,
levels = the model's stages in descending order (coarse to fine), alpha 0.6
(``DEFAULT_ALPHA``); for pytorch-AdaIN weights the base is adain, (4,), 1.0.
Values are validated (method in ``wct``/``adain``, levels a non-empty list of
the model's stages, 0 <= alpha <= 1) and a bad one raises
:class:`ModelDefaultsError` naming the file.

Which defaults a given ``--model`` has (a zoo name, a bundle, a weights
folder) is :func:`ultrastyle.models.sources.model_defaults`. This module stays
torch-free and below the registry, which validates its entries with it.
"""


from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ultrastyle.core.arch import STAGES
from ultrastyle.models.errors import ZooError

__all__ = [
    "DEFAULT_MODEL",
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_ALPHA",
    "DEFAULTS_KEY",
    "ModelDefaults",
    "ModelDefaultsError",
    "standard_defaults",
    "defaults_from_dict",
]

DEFAULT_MODEL = "cd-wct-16x"  # the model every command and `load_model` use unless told (`models.pretrained` imports it)
METHODS = ("wct", "adain")
DEFAULT_METHOD = "wct"
DEFAULT_ALPHA = 0.6  # also the cascade's (`runtime.cascade` imports it; this module stays torch-free)
DEFAULTS_KEY = "defaults"
_KEYS = ("method", "levels", "alpha")


class ModelDefaultsError(ZooError, ValueError):
    """Invalid defaults; the message names the file. A ZooError, so every CLI that reports zoo errors reports it."""


@dataclass(frozen=True)
class ModelDefaults:
    """``method`` (wct | adain), ``levels`` (stages to run, coarse to fine) and ``alpha`` (0..1)."""

    method: str
    levels: tuple[int, ...]
    alpha: float

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ModelDefaultsError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not self.levels or any(k not in STAGES for k in self.levels):
            raise ModelDefaultsError(f"levels must be a non-empty tuple of stages 1..5, got {self.levels!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ModelDefaultsError(f"alpha must be in 0..1, got {self.alpha!r}")

    def to_dict(self) -> dict:
        """The JSON form (``zoo.json``, ``architecture.json``, a bundle manifest)."""
        return {"method": self.method, "levels": list(self.levels), "alpha": self.alpha}

    def restricted(self, stages: Iterable[int]) -> ModelDefaults:
        """These defaults for a model holding only ``stages``: levels outside them dropped
        (all of ``stages``, descending, if none is left)."""
        have = set(stages)
        levels = tuple(k for k in self.levels if k in have) or tuple(sorted(have, reverse=True))
        return ModelDefaults(self.method, levels, self.alpha)


def standard_defaults(stages: Iterable[int] = STAGES, *, base: str | None = None) -> ModelDefaults:
    """The base defaults of a model with ``stages``: wct, stages descending, 0.6.

    ``base="pytorch-adain"``: adain, (4,), 1.0 (the published AdaIN setting).
    """
    if base == "pytorch-adain":
        return ModelDefaults("adain", (4,), 1.0)
    return ModelDefaults(DEFAULT_METHOD, tuple(sorted(set(stages), reverse=True)), DEFAULT_ALPHA)


def defaults_from_dict(raw: object, stages: Iterable[int], *, where: str, base: str | None = None) -> ModelDefaults:
    """Validate a ``"defaults"`` mapping for a model with ``stages``; missing keys take the base values.

    ``where`` names the file (and entry) in error messages.
    """
    stages = tuple(sorted(set(stages)))
    if not isinstance(raw, Mapping):
        raise ModelDefaultsError(f"{where}: \"defaults\" must be an object like {{\"method\": \"wct\", \"levels\": [5, 4], \"alpha\": 0.6}}, got {raw!r}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ModelDefaultsError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in \"defaults\"; known keys: {', '.join(_KEYS)}")
    std = standard_defaults(stages, base=base)
    method = raw.get("method", std.method)
    if method not in METHODS:
        raise ModelDefaultsError(f"{where}: defaults.method must be one of {', '.join(METHODS)}, got {method!r}")
    levels = raw.get("levels", list(std.levels))
    ok = (
        isinstance(levels, (list, tuple)) and levels
        and all(isinstance(k, int) and not isinstance(k, bool) and k in stages for k in levels)
    )  # fmt: skip
    if not ok:
        raise ModelDefaultsError(
            f"{where}: defaults.levels must be a non-empty list of the model's stages "
            f"{', '.join(map(str, stages))} (coarse to fine), got {levels!r}"
        )
    alpha = raw.get("alpha", std.alpha)
    if (
        not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
        or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0
    ):  # fmt: skip
        raise ModelDefaultsError(f"{where}: defaults.alpha must be a number in 0..1, got {alpha!r}")
    return ModelDefaults(str(method), tuple(int(k) for k in levels), float(alpha))
