"""Shipping a model from Python: what `ultrastyle export`, `calibrate` and `build` do, as functions.

    import ultrastyle
    bundle = ultrastyle.export_model("cd-wct-16x", "bundle/")               # validated ONNX graphs + manifest
    ultrastyle.calibrate(bundle, "photos/", activations="int8")           # int8 Q/DQ graphs in the bundle
    report = ultrastyle.check_tensorrt(bundle, precision="int8")          # static check, no GPU needed
    ultrastyle.build_tensorrt(bundle, precision="int8")                   # engines for this GPU (TensorRT)
    ultrastyle.load(bundle.path, precision="int8").stylize(...)           # run it

The command line calls these; they raise the library's typed errors
(`OptionError` for a bad keyword, `BundleError`, `CalibrationError`,
`RunnerError`, `ZooError`, `CheckpointError`), never exit.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ultrastyle import options as check
from ultrastyle.errors import Remedy, Setting, remedied, remedies_of
from ultrastyle.errors import warn as warn_user
from ultrastyle.export.bundle import Bundle, check_bundle_target, export_bundle, is_bundle, read_bundle
from ultrastyle.export.spec import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportSpec
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.options import OptionError

if TYPE_CHECKING:
    from ultrastyle.calibration.quantize import CalibrationSettings
    from ultrastyle.trt.build import BuildReport
    from ultrastyle.trt.check import CheckReport

__all__ = ["build_tensorrt", "calibrate", "check_tensorrt", "export_model"]


def _stages(stages: Iterable[int] | str | int | None) -> tuple[int, ...] | None:
    return check.stage_set("stages", stages)  # an OptionError for anything but stages


def export_model(
    model: str | Path,
    output: str | Path,
    *,
    stages: Iterable[int] | str | int | None = None,
    opset: int = DEFAULT_OPSET,
    aux: bool = False,
    on_network: Callable[[str], None] | None = None,
    force: bool = False,
) -> Bundle:
    """A zoo model or weights folder's stage networks as a validated ONNX bundle in ``output`` (`ultrastyle export`).

    ``stages`` None: every stage the model has. ``aux``: also the encoders with
    their Q_k embeddings as outputs (training bundles). ``output`` must be new,
    empty or a bundle (replaced whole; one holding int8 graphs or TensorRT engines only with ``force``); anything
    else is refused before the model loads. The manifest records the source weights' sha256.
    """
    from ultrastyle.models.pretrained import load_model
    from ultrastyle.models.sources import model_stages
    from ultrastyle.runtime.backends.select import weights_digest

    model, output = check.model_path(model), check.user_path(output)
    # Before the model loads. An int: 17.0 is in range(13, 22) too, and failed later as a TypeError.
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset not in SUPPORTED_OPSETS:
        raise OptionError("opset", f"expected an integer {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got {opset!r}; "
                                   f"give e.g. {DEFAULT_OPSET}")  # fmt: skip
    opset = int(opset)  # a numpy integer would not go into the manifest's JSON
    chosen = _stages(stages)
    check_bundle_target(output, force=force)
    if chosen is not None and (missing := sorted(set(chosen) - set(have := model_stages(model)))):  # before anything is downloaded
        raise OptionError("stages", f"{model} has no stage(s) {missing}; it has {list(have)}: choose among them")
    net = load_model(model, stages=chosen, aux=aux)
    _, files = weights_digest(model, net.stages)
    kinds = ExportSpec().kinds + (("encoder_aux",) if aux else ())
    return export_bundle(net, output, spec=ExportSpec(opset=opset, stages=net.stages, kinds=kinds), source_weights=files, on_network=on_network,
                         force=force)  # fmt: skip


def calibration_settings(**settings: Any) -> CalibrationSettings:
    """`CalibrationSettings` from keywords; a typo or a bad value is an `OptionError` naming the keyword."""
    from ultrastyle.calibration.quantize import CalibrationSettings
    from ultrastyle.options import known_keywords

    allowed = frozenset(f.name for f in dataclasses.fields(CalibrationSettings) if f.name not in ("images", "version"))
    known_keywords(settings, allowed)
    return CalibrationSettings(**settings)  # an OptionError naming the keyword


def calibrate(
    bundle: Bundle | str | Path,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    stages: Iterable[int] | str | int | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    on_export: Callable[[str], None] | None = None,
    **settings: Any,
) -> Bundle:
    """Int8 (Q/DQ) graphs for ``bundle``'s encoders and fused decoders from real ``images`` (`ultrastyle calibrate`): a
    folder, or a list of files (one tile from each of the first ``samples`` readable ones, as `calibration.data.TileSampler`).

    ``bundle``: a bundle, or a zoo name / weights folder whose cached bundle is
    calibrated (exported first if needed). ``settings``: `CalibrationSettings`
    fields (``method``, ``per_channel``, ``samples``, ``tile``, ``image_size``,
    ``seed``, ``keep_float``, ``percentile``, ``activations``: ``"int8"`` for
    TensorRT). ``stages`` None: every stage of the bundle. ``warn``: what the calibration notes (a setting left out,
    graphs far from float32), default `CalibrationWarning` warnings. Returns the updated bundle.
    """
    from ultrastyle.calibration.data import calibration_images
    from ultrastyle.calibration.quantize import calibrate_bundle
    from ultrastyle.runtime.backends.select import ensure_bundle

    chosen = calibration_settings(**settings)
    wanted = _stages(stages)
    if warn is None:  # said as Python warnings, not dropped: a bundle far from float32 must not pass in silence
        from ultrastyle.calibration.quantize import CalibrationWarning

        warn = lambda message: warn_user(message, CalibrationWarning)  # noqa: E731
    bundle = check.model_path(bundle, "bundle", "a bundle, a zoo name or a model folder")
    files = calibration_images(images)  # a folder without images (or an empty list) is refused before a bundle is exported
    target = bundle if isinstance(bundle, Bundle) else ensure_bundle(bundle, on_export=on_export)
    return calibrate_bundle(target, files, chosen, stages=wanted, on_progress=on_progress, warn=warn)


def _as_bundle(bundle: Bundle | str | Path, on_export: Callable[[str], None] | None = None) -> Bundle:
    """A bundle, read now (a `Bundle`'s graphs checked now, not when it was made); a zoo name or weights folder: its
    cached bundle, exported first where needed (as `calibrate` takes them, and `stylize` finds engines built there)."""
    if isinstance(bundle, Bundle) or (not is_zoo_name(bundle) and (is_bundle(bundle) or not _model_source(bundle))):
        return read_bundle(bundle.path if isinstance(bundle, Bundle) else bundle)  # else read_bundle says what it is
    from ultrastyle.runtime.backends.select import ensure_bundle

    return ensure_bundle(bundle, on_export=on_export)


def _trt_precision(precision: object) -> str:
    """``precision`` of TensorRT engines, in any case as `check.choice` takes names."""
    from ultrastyle.trt import PRECISIONS

    try:
        return check.choice("precision", precision, PRECISIONS)
    except OptionError:
        raise OptionError("precision", f"TensorRT engines are {', '.join(PRECISIONS)}, not {precision!r}") from None


def _model_source(given: str | Path) -> bool:
    """Whether ``given`` is meant as a model: a folder of weights, or a name (the zoo says whether it knows it)."""
    from ultrastyle.models.sources import folder_format, folder_stages

    if is_zoo_name(given):  # the zoo's, whatever folder of that name is here
        return True
    path = Path(given)
    if path.is_dir():
        return bool(folder_stages(path)) or folder_format(path) == "pytorch-adain"
    return not path.exists() and "/" not in str(given) and "\\" not in str(given)


def _bundle_and_ranges(bundle: Bundle | str | Path, precision: str, stages: Iterable[int] | str | int | None, tiles: dict[str, int | None],
                       on_export: Callable[[str], None] | None = None):  # fmt: skip
    from ultrastyle.trt.profiles import requested_ranges

    for name, side in tiles.items():
        if side is not None:
            check.count(name, side, least=1, what="pixels (a tile side)")
    b = _as_bundle(bundle, on_export)
    chosen = _stages(stages) or tuple(sorted(b.stages))
    if why := b.stages_problem(chosen):
        raise remedied(OptionError("stages", f"{why}; choose among them (stages)"), Setting("stages"))
    try:
        ranges = requested_ranges(b.arch, chosen, precision=precision, **tiles)
    except ValueError as exc:  # "tile_min=900 is above tile_max=512; ...": the first setting is the option
        named = remedies_of(getattr(exc, "remedy", None))
        raise remedied(OptionError(named[0].keyword if named else "tile_max", str(exc)), named) from None
    for name, side in tiles.items():  # each stage's profile is on its grid: a side given is said where it moved
        moved = [f"{getattr(ranges[k], name.removeprefix('tile_'))} px at stage {k}" for k in chosen
                 if side is not None and getattr(ranges[k], name.removeprefix("tile_")) != side]  # fmt: skip
        if moved:
            given = Setting(name, side)
            notice = ProfileWarning(f"{given.python()} is {', '.join(moved)}: a profile's sides are multiples of the stage's grid "
                                    "(2^(k-1) px), at least two cells, and in order")  # fmt: skip
            notice.remedy = given  # type: ignore[attr-defined]  # a front end says the setting its way
            warn_user(notice)
    return b, chosen, ranges


class ProfileWarning(UserWarning):
    """A tile side given for TensorRT profiles that a stage's grid moved (rounded to its grid, at least two cells, in order)."""


def check_tensorrt(
    bundle: Bundle | str | Path,
    *,
    precision: str = "fp32",
    stages: Iterable[int] | str | int | None = None,
    tile_min: int | None = None,
    tile_opt: int | None = None,
    tile_max: int | None = None,
) -> CheckReport:
    """Whether TensorRT can build ``bundle`` at ``precision``, checked statically (no GPU or TensorRT needed; `build --check`).

    ``bundle``: a bundle, or a zoo name / weights folder (its cached bundle, exported first where needed). The report
    lists findings (ops and attributes the parser lacks, Q/DQ rules, profiles for the tile sides, stale engines);
    ``report.ok`` is False on any error.
    """
    from ultrastyle.trt.check import check_bundle

    precision = _trt_precision(precision)
    bundle = check.user_path(bundle)
    b, chosen, ranges = _bundle_and_ranges(bundle, precision, stages, {"tile_min": tile_min, "tile_opt": tile_opt, "tile_max": tile_max})
    return check_bundle(b, precisions=(precision,), ranges=ranges, stages=chosen)


def build_tensorrt(
    bundle: Bundle | str | Path,
    *,
    precision: str = "fp32",
    stages: Iterable[int] | str | int | None = None,
    tile_min: int | None = None,
    tile_opt: int | None = None,
    tile_max: int | None = None,
    workspace: int | str = "1GB",
    timing_cache: str | Path | None = None,
    force: bool = False,
    verbose: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> BuildReport:
    """TensorRT engines for ``bundle`` on this GPU, into ``BUNDLE/engines/<gpu>_sm<cc>_trt<version>/`` (`ultrastyle build`).

    ``bundle``: a bundle, or a zoo name / weights folder: its cached bundle (exported first where needed), where
    ``stylize``'s ``backend="auto"`` finds the engines. Fresh engines are kept (``force`` rebuilds them). Tile sides in pixels
    (None: what the planner makes for a 2GB budget); ``workspace``: bytes or
    ``"1GB"``. Without TensorRT or a GPU, `TensorRTUnavailable` says what is missing.
    """
    from ultrastyle.trt.build import build_engines

    precision = _trt_precision(precision)
    workspace_bytes = check.memory_budget("workspace", workspace)
    if workspace_bytes is None:
        raise OptionError("workspace", "expected a number of bytes or a size such as '1GB', got None; give e.g. 1GB")
    bundle = check.user_path(bundle)
    if not isinstance(bundle, Bundle) and not is_bundle(bundle) and _model_source(bundle):  # a model to export first: not before TensorRT is known to be here
        from ultrastyle.models.registry import get_entry
        from ultrastyle.trt.env import TensorRTUnavailable, require_tensorrt_stack

        if not Path(bundle).is_dir():
            get_entry(str(bundle))  # an unknown name first: the advice below would name it again, to be refused then
        fix = Remedy("check_tensorrt", (str(bundle),))
        try:
            require_tensorrt_stack("building TensorRT engines", f"{fix.python()} checks the model's bundle without them")
        except TensorRTUnavailable as exc:
            raise remedied(exc, fix) from None
    b, chosen, ranges = _bundle_and_ranges(bundle, precision, stages, {"tile_min": tile_min, "tile_opt": tile_opt, "tile_max": tile_max},
                                           on_export=on_step)  # fmt: skip
    return build_engines(
        b, precision=precision, ranges=ranges, stages=chosen, workspace=workspace_bytes, timing_cache=timing_cache,
        force=force, verbose=verbose, on_step=on_step,
    )  # fmt: skip
