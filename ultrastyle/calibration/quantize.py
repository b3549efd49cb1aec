"""Static int8 quantization of a bundle's stage networks into Q/DQ ONNX graphs.

ONNX Runtime's static quantization (``quantize_static``, QDQ format) inserts
QuantizeLinear/DequantizeLinear pairs around every quantizable tensor, with
scales from a calibration pass over `data.TileSampler` tiles. Weights are
symmetric int8 (per output channel or per tensor), biases stay float (ONNX
Runtime and TensorRT fold them into the int8 convolution); activations are
uint8 for the CPU or signed int8 for TensorRT (below). On the CPU, ONNX
Runtime fuses DQ -> Conv -> Q into int8 convolutions (VNNI).

Activations (``activations``), measured in benchmarks/int8_quality.py:

- ``"uint8"`` (default; ONNX Runtime's u8 x s8 convolutions with VNNI):
  asymmetric ranges, so a ReLU output [0, max] uses all 256 steps and ONNX
  Runtime folds the ReLU into the int8 convolution (end to end about as fast
  as signed int8: 1.21-1.41x vs 1.13-1.36x over fp32 across runs). TensorRT cannot build
  these graphs (its INT8 is signed); ``build`` refuses them with the fix.
- ``"int8"``: signed, symmetric, zero-point 0: what TensorRT requires. A
  ReLU output then uses only the positive half (7 bits), which cost ~3.5 dB
  on the 5-stage cascade.

What stays in float (``keep_float``):

- ``"transform"``: only the fused WCT/AdaIN map (the MatMul and Add in front of
  ``decoder_affineK``): A and b change with every image and style, so no
  calibrated range fits them.
- ``"ends"`` (default): also the encoder's first convolution (the 1x1 colour
  transform on RGB, negligible compute) and the decoder's last one, whose
  output is the image itself: quantizing it would put 8-bit steps straight
  into the output, on top of the other layers' error.
- ``"deep"``: ``ends``, and the deepest stage's encoder stays float32 as a
  whole: of all networks, keeping it float gained the most (+1.6 dB, the
  others 0-0.6 dB). Its features feed the widest whitening through the
  longest chain of quantized convolutions; no group of its layers alone
  accounts for the gain (measured group by group), so it is all or nothing.

The Q/DQ graphs are written beside the float32 graphs (``encoderK.int8.onnx``)
and recorded in the manifest as ``networks[name]["int8"] = {"file", "sha256",
"source_sha256", "seconds", "probe_snr_db", "settings"}`` (``entropy_bins``
too for entropy), where the TensorRT builder and the ONNX Runtime runner find
them (`export.int8`). The manifest is rewritten atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ultrastyle import options as check
from ultrastyle.calibration.constants import (
    ACTIVATIONS,
    DEFAULT_ACTIVATIONS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_KEEP_FLOAT,
    DEFAULT_METHOD,
    DEFAULT_PERCENTILE,
    DEFAULT_SAMPLES,
    DEFAULT_TILE,
    KEEP_FLOAT,
    METHODS,
    MIN_IMAGE_SIZE,
    MIN_TILE,
)
from ultrastyle.calibration.data import Feed, FeedReader, TileSampler, calibration_images, probe_tiles, stage_feeds
from ultrastyle.errors import Setting, remedied
from ultrastyle.export.bundle import MANIFEST, Bundle, BundleError, bundle_in_use, load_graph, read_bundle
from ultrastyle.export.int8 import calibrated_activations
from ultrastyle.io.atomic import atomic_path, write_atomic
from ultrastyle.io.digest import sha256_file
from ultrastyle.models.sources import model_defaults
from ultrastyle.options import OptionError
from ultrastyle.runtime.backends.onnxruntime_backend import EXACT_INT8, OnnxRuntimeRunner

if TYPE_CHECKING:
    import onnx

QUANTIZED_KINDS = ("encoder", "decoder_affine")
CALIBRATION_VERSION = 2

ProgressCallback = Callable[[str, int, int], None]


class CalibrationWarning(UserWarning):
    """A calibration that ran but may not serve: a setting it left out, tiles smaller than asked, int8 graphs far from
    float32 on held-out tiles. (The command line prints these as ``warning:`` lines.)"""


class CalibrationError(RuntimeError):
    """Quantization that could not be done: says which network and why."""


class CalibrationRefused(CalibrationError):
    """Settings the bundle cannot take (stages it lacks, mixed activation kinds); raised before anything is written."""


@dataclass(frozen=True)
class CalibrationSettings:
    """Everything that determines the Q/DQ graphs (recorded in the manifest)."""

    method: str = DEFAULT_METHOD
    per_channel: bool = True  # one scale per output channel of each weight: +1.6 dB, still TensorRT-compatible
    samples: int = DEFAULT_SAMPLES
    tile: int = DEFAULT_TILE
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0
    keep_float: str = DEFAULT_KEEP_FLOAT
    percentile: float = DEFAULT_PERCENTILE
    activations: str = DEFAULT_ACTIVATIONS
    version: int = CALIBRATION_VERSION
    images: list[str] = field(default_factory=list)  # file names, for the record

    def __post_init__(self) -> None:  # `OptionError` (a ValueError) naming the keyword
        object.__setattr__(self, "method", check.choice("method", self.method, METHODS))  # any case, as the command line
        if not isinstance(self.per_channel, bool):
            raise OptionError("per_channel", f"expected True or False, got {self.per_channel!r}")
        check.count("samples", self.samples, least=1)
        check.count("tile", self.tile, least=MIN_TILE, what="pixels (the tile side)")
        check.count("image_size", self.image_size, least=MIN_IMAGE_SIZE, what="pixels (the images' long side)")
        check.count("seed", self.seed)
        object.__setattr__(self, "keep_float", check.choice("keep_float", self.keep_float, KEEP_FLOAT))
        object.__setattr__(self, "activations", check.choice("activations", self.activations, ACTIVATIONS))
        if check.number("percentile", self.percentile, above=50, example=DEFAULT_PERCENTILE) > 100:
            raise OptionError("percentile", f"expected a number in (50, 100], got {self.percentile}; give e.g. {DEFAULT_PERCENTILE}")


def float_nodes(model: onnx.ModelProto, kind: str, keep_float: str) -> list[str]:
    """Names of the nodes of a stage graph that stay in float (see the module docstring).

    Whole networks kept in float (``"deep"``) are chosen by `float_networks`.
    """
    nodes = list(model.graph.node)
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    keep: list[str] = []
    if kind == "decoder_affine":
        # The transform: everything before the first Pad (Shape/Reshape/MatMul/Add/Reshape).
        for n in nodes:
            if n.op_type in ("Pad", "Conv"):
                break
            keep.append(n.name)
    if keep_float in ("ends", "deep") and convs:
        keep.append(convs[0] if kind == "encoder" else convs[-1])
    return keep


def float_networks(keep_float: str, stages: tuple[int, ...]) -> set[str]:
    """Networks calibration leaves entirely in float32 (no int8 graph; every backend runs the fp32 one)."""
    return {f"encoder{max(stages)}"} if keep_float == "deep" and stages else set()


def quantize_graph(src: Path, dst: Path, kind: str, reader: FeedReader, settings: CalibrationSettings) -> None:
    """One float32 graph -> its Q/DQ graph at ``dst`` (ONNX Runtime static quantization)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    model = load_graph(src)
    unsigned = settings.activations == "uint8"
    extra = {
        "ActivationSymmetric": not unsigned,  # zero-point 0: what TensorRT requires
        "WeightSymmetric": True,
        "QuantizeBias": False,  # biases stay float; TensorRT and ORT fold them into the int8 conv
        "CalibPercentile": settings.percentile,
        "CalibTensorRangeSymmetric": not unsigned,
    }
    # Nothing process-wide changes while it runs (other threads keep writing): no chdir (ORT writes its augmented model
    # into a temp folder of its own), no stdout redirect, no root logger level.
    try:
        with _ort_quiet():
            quantize_static(
                model_input=src,
                model_output=dst,
                calibration_data_reader=reader,
                quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel,
                activation_type=QuantType.QUInt8 if unsigned else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method[settings.method],
                nodes_to_exclude=float_nodes(model, kind, settings.keep_float),
                extra_options=extra,
            )
    except Exception as exc:  # noqa: BLE001 - ORT raises many types; report them as one
        raise CalibrationError(f"{src.name}: ONNX Runtime quantization failed: {exc}") from exc


class _FromOrtQuantization(logging.Filter):
    """Drops ORT quantization's warnings and notes (its advice to pre-process: shape inference is done at export),
    logged on the root logger by the threads calibrating; its errors, other threads' and other modules' records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.thread in _QUIET_THREADS and record.levelno <= logging.WARNING
        return not (ours and "/onnxruntime/quantization/" in record.pathname.replace("\\", "/"))


_QUIET_LOCK = threading.Lock()
_QUIET_USERS = 0
_QUIET_THREADS: set[int] = set()  # the threads calibrating now (a thread's `_ort_quiet` blocks do not nest)
_QUIET_FILTER = _FromOrtQuantization()
_SWAPPED: dict[str, Any] = {}  # what `_ort_quiet` replaced in ORT's quantize module, put back by the last one out


@contextlib.contextmanager
def _ort_quiet() -> Iterator[None]:
    """ORT's calibrators silent: their progress prints (``print`` shadowed in their module alone) and warnings (a filter
    on the root logger: the calibrating threads' ORT records up to WARNING), and entropy with 2048 bins. Counted:
    calibrations in several threads share it. While any runs, ORT's calibrate module prints nothing and its entropy
    gets those bins for any caller in the process; the last one out puts back what it replaced."""
    global _QUIET_USERS
    import onnxruntime.quantization.calibrate as calibrate_module

    quantize_module = importlib.import_module("onnxruntime.quantization.quantize")  # the module: the package's `quantize` is a function

    with _QUIET_LOCK:
        _QUIET_USERS += 1
        _QUIET_THREADS.add(threading.get_ident())
        if _QUIET_USERS == 1:
            calibrate_module.print = lambda *args, **kwargs: None  # type: ignore[attr-defined]
            if hasattr(quantize_module, "create_calibrator"):
                _SWAPPED["create_calibrator"] = quantize_module.create_calibrator  # ORT's, or an application's own patch
                quantize_module.create_calibrator = _with_entropy_bins(quantize_module.create_calibrator)
            logging.getLogger().addFilter(_QUIET_FILTER)
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_USERS -= 1
            _QUIET_THREADS.discard(threading.get_ident())
            if _QUIET_USERS == 0:
                logging.getLogger().removeFilter(_QUIET_FILTER)
                del calibrate_module.print  # type: ignore[attr-defined]
                if "create_calibrator" in _SWAPPED:
                    quantize_module.create_calibrator = _SWAPPED.pop("create_calibrator")


# quantize_static passes no bin counts to its entropy calibrator, whose defaults (128 bins, 128 quantized) leave the
# KL search one candidate, the whole range: it gave minmax's graphs byte for byte. TensorRT's entropy calibration uses
# 2048 bins; so does this.
ENTROPY_BINS = 2048
# Below this, an int8 graph is called far from float32 (`probe_snr` on `data.probe_tiles`). Measured per graph on CD
# 16x (2026-12-07): calibrated on the train photos (defaults, or 2 tiles of 128 px) 27.4-39.0 dB; on one flat grey
# image 1.7-13.8 dB. It catches a broken calibration, not a merely weaker one: 2 tiles of 128 px probe as the defaults
# do, yet cost the cascade 4-7 dB (a user review's PSNR).
PROBE_SNR_WARN_DB = 20.0


def _with_entropy_bins(create: Callable[..., Any]) -> Callable[..., Any]:
    def create_calibrator(*args: Any, **kwargs: Any) -> Any:
        from onnxruntime.quantization import CalibrationMethod

        if kwargs.get("calibrate_method") == CalibrationMethod.Entropy:
            kwargs["extra_options"] = {"num_bins": ENTROPY_BINS, "num_quantized_bins": 128, **(kwargs.get("extra_options") or {})}
        return create(*args, **kwargs)

    return create_calibrator


def calibrate_bundle(
    bundle: Bundle | str | Path,
    images: str | Path | Sequence[Path],
    settings: CalibrationSettings | None = None,
    *,
    stages: tuple[int, ...] | None = None,
    on_progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> Bundle:
    """Calibrate and quantize the bundle's encoders and fused decoders; returns the updated bundle.

    ``images``: a folder of images, or its files as `calibration_images` lists them.

    The float32 reference for the decoders' inputs is the bundle's own
    encoder, run with ONNX Runtime, mapped by the bundle's own method and alpha
    (its defaults: WCT or AdaIN).
    """
    # A `Bundle` is opened again: its graphs are checked against the manifest now, not when it was made.
    bundle = read_bundle(bundle.path if isinstance(bundle, Bundle) else bundle)
    if not os.access(bundle.path, os.W_OK):  # before any work: the int8 graphs and the manifest are written there
        raise BundleError(f"{bundle.path}: not writable, and calibration writes its int8 graphs into the bundle; copy the bundle "
                          "to a folder you can write, and calibrate that")  # fmt: skip
    with bundle_in_use(bundle.path):  # two at once each wrote the manifest: one's int8 graphs were lost, and both said done
        return _calibrate(read_bundle(bundle.path), images, settings, stages, on_progress, warn)  # as the last one left it


def _calibrate(bundle: Bundle, images: str | Path | Sequence[Path], settings: CalibrationSettings | None, stages: tuple[int, ...] | None,
               on_progress: ProgressCallback | None, warn: Callable[[str], None] | None) -> Bundle:  # fmt: skip
    files = calibration_images(images)
    settings = settings or CalibrationSettings()
    stages = tuple(stages or bundle.stages)
    if why := bundle.stages_problem(stages):  # before any work: nothing of the bundle is touched
        raise CalibrationRefused(why)
    sampler = TileSampler(tuple(files), settings.tile, settings.samples, settings.image_size, settings.seed)
    read = sampler.read(warn, limit=settings.samples)  # the images the tiles come from, and no more
    tiles = sampler.tiles_of([image for _, image in read])
    settings = CalibrationSettings(**{**asdict(settings), "images": [f.name for f, _ in read]})  # the images used, for the record
    if warn and settings.method != "percentile" and settings.percentile != DEFAULT_PERCENTILE:
        warn(f"percentile={settings.percentile:g} is left out: it sets the range of method 'percentile', not {settings.method!r}")
    if warn and (small := min(min(t.shape[-2:]) for t, _ in tiles)) < settings.tile:
        warn(f"tiles are {small} px, not {settings.tile}: the smallest image is {small} px on its short side at {settings.image_size} px "
             "on its long one (image_size), and every tile has one size")  # fmt: skip
    arch = bundle.arch
    defaults = model_defaults(bundle.path)  # an AdaIN bundle's decoders see AdaIN maps at its alpha, not WCT's
    manifest = json.loads((bundle.path / MANIFEST).read_text(encoding="utf-8"))
    _check_consistent(bundle, manifest, stages, settings)
    earlier = [manifest["networks"][f"{kind}{k}"].get("int8") for k in stages for kind in QUANTIZED_KINDS]
    if warn and (again := sorted({k for k in stages for kind in QUANTIZED_KINDS if manifest["networks"][f"{kind}{k}"].get("int8")})):
        methods = sorted({str((e.get("settings") or {}).get("method", "?")) for e in earlier if isinstance(e, dict)})  # each its own
        warn(f"replacing the int8 graphs of stage(s) {again}, calibrated before ({', '.join(methods)}, "
             f"{calibrated_activations(manifest)} activations)")  # fmt: skip
    keep = float_networks(settings.keep_float, tuple(bundle.stages))
    total, done = len(stages) * len(QUANTIZED_KINDS), 0
    dropped: list[Path] = []
    # Every int8 graph is written beside its target and renamed into place only once all are done (`commit`
    # exits first), then the manifest is written: a run that fails or is interrupted before that leaves the
    # bundle as it was (a crash between the renames and the manifest would leave digests to re-calibrate).
    weak: list[str] = []
    with OnnxRuntimeRunner(bundle) as runner, ExitStack() as commit:
        for k in stages:
            feeds = stage_feeds(runner.encode, k, arch.grid(k), tiles, method=defaults.method, alpha=defaults.alpha)
            probes = stage_feeds(runner.encode, k, arch.grid(k), probe_tiles(), method=defaults.method, alpha=defaults.alpha)
            for kind in QUANTIZED_KINDS:
                name = f"{kind}{k}"
                if on_progress:
                    on_progress(f"calibrating {name} ({settings.method})", done, total)
                out = bundle.path / f"{name}.int8.onnx"
                if name in keep:  # float32 on purpose: drop an int8 graph from an earlier calibration
                    manifest["networks"][name].pop("int8", None)
                    dropped.append(out)
                    done += 1
                    continue
                t0 = time.perf_counter()
                tmp = commit.enter_context(atomic_path(out.absolute()))
                quantize_graph(bundle.graph_path(name).absolute(), tmp, kind, FeedReader(feeds[name]), settings)
                seconds = time.perf_counter() - t0
                snr = probe_snr(bundle.graph_path(name), tmp, probes[name])
                if snr < PROBE_SNR_WARN_DB:
                    weak.append(f"{name} {snr:.1f} dB")
                manifest["networks"][name]["int8"] = {
                    "file": out.name,
                    "sha256": sha256_file(tmp),
                    "source_sha256": manifest["networks"][name]["sha256"],
                    "seconds": round(seconds, 1),
                    # int8 against float32 on held-out tiles (`probe_snr`); None where not finite (JSON has no infinity)
                    "probe_snr_db": round(snr, 1) if math.isfinite(snr) else None,
                    # Per graph: a later run over some stages must not rewrite what the others were made with.
                    "settings": asdict(settings),  # the images too: a later run of other stages replaces the top-level record
                    **({"entropy_bins": ENTROPY_BINS} if settings.method == "entropy" else {}),  # earlier entropy was minmax
                }
                done += 1
    if weak and warn:  # entropy's ranges are the narrow ones here (19.5 dB to percentile's 27.3): the method, not the images
        fix = "calibrate with the percentile method" if settings.method == "entropy" else "calibrate on more, larger and more varied images"
        warn(f"the int8 graphs are far from float32 on held-out tiles ({', '.join(weak)}; calibrations of varied photos give "
             f"{PROBE_SNR_WARN_DB:g} dB or more): {fix}")  # fmt: skip
    # The latest run's settings and the stages it calibrated (each int8 entry keeps its own `settings`).
    manifest["calibration"] = {**asdict(settings), "stages": list(stages)}
    _write_manifest(bundle.path, manifest)
    for out in dropped:  # after the manifest no longer lists them
        out.unlink(missing_ok=True)
    if on_progress:
        on_progress("calibrated", total, total)
    return read_bundle(bundle.path)


def probe_snr(fp32: Path, int8: Path, feeds: list[Feed]) -> float:
    """Signal-to-noise ratio (dB) of the ``int8`` graph's output against the ``fp32`` graph's over ``feeds``: a
    calibration that broke a network (too few, flat or tiny images) shows here, on inputs it was not fitted to."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(*EXACT_INT8)  # as the runner runs them: no u8 x s8 saturation on CPUs without VNNI
    sessions = [ort.InferenceSession(str(g), options, providers=["CPUExecutionProvider"]) for g in (fp32, int8)]
    signal = noise = 0.0
    for feed in feeds:
        ref, got = (s.run(None, feed)[0].astype(np.float64) for s in sessions)
        if not np.all(np.isfinite(got)):  # NaN or inf out of the int8 graph: as broken as can be
            return -math.inf
        signal += float(np.sum(ref**2))
        noise += float(np.sum((ref - got) ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _check_consistent(bundle: Bundle, manifest: dict, stages: tuple[int, ...], settings: CalibrationSettings) -> None:
    """Refuse to mix signed and unsigned graphs in one bundle (a backend takes one kind or the other)."""
    redone = {f"{kind}{k}" for kind in QUANTIZED_KINDS for k in stages}
    others = [n for n, e in manifest["networks"].items() if isinstance(e, dict) and e.get("int8") and n not in redone]
    old = calibrated_activations(manifest)
    if others and old != settings.activations:
        raise remedied(CalibrationRefused(
            f"{bundle.path}: {', '.join(sorted(others))} were calibrated with {old} activations, this run asks for "
            f"{settings.activations}; calibrate every stage at once (stages=None) to switch"
        ), Setting("stages", None))


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
