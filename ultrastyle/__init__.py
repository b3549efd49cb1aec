"""ultrastyle: ultra-resolution universal style transfer.

    import ultrastyle
    image = ultrastyle.stylize("photo.jpg", "art.jpg")            # (H, W, 3) uint8, the model's defaults
    with ultrastyle.load("cd-wct-16x") as s:                       # one model for many calls
        s.stylize(image, "art.jpg", alpha=0.8, output="out.png")
    ultrastyle.stylize_batch(["photos/"], ["art.jpg"], "out/")   # what `ultrastyle stylize` does
    bundle = ultrastyle.export_model("cd-wct-16x", "bundle/")      # `export`; then calibrate, check_tensorrt, build_tensorrt
    ultrastyle.import_model("cd-wct-16x", "downloads/")           # `models import`; fetch_model, verify_model, list_models, remove_model
    ultrastyle.distill_encoder(ultrastyle.DistillConfig(teacher="cd-wct-16x", stage=1, images="photos/", out="mine/"))  # `distill`
    ultrastyle.ready(ultrastyle.doctor())                           # `doctor`: what is installed and usable here

The names below are imported on first use, so ``import ultrastyle`` stays
cheap (no torch) for the command line's ``--help`` and torch-free modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ultrastyle._version import __version__

_API = {
    "stylize": "ultrastyle.api",
    "stylize_batch": "ultrastyle.api",
    "load": "ultrastyle.api",
    "Stylizer": "ultrastyle.api",
    "ClusterStylizer": "ultrastyle.api",
    "ImageLike": "ultrastyle.api",
    "make_options": "ultrastyle.api",
    "ModelDefaults": "ultrastyle.models.defaults",
    "OptionError": "ultrastyle.api",
    "RunnerError": "ultrastyle.errors",
    "ZooError": "ultrastyle.models.errors",
    "UnknownModelError": "ultrastyle.models.registry",
    "CheckpointError": "ultrastyle.models.convert",
    "ClusterError": "ultrastyle.distributed.cluster",
    "BatchSummary": "ultrastyle.runtime.pairs",
    "BatchInterrupted": "ultrastyle.runtime.pairs",
    "PairResult": "ultrastyle.runtime.pairs",
    "OutputCollisionError": "ultrastyle.runtime.pairs",
    "TileWarning": "ultrastyle.core.plan",
    "ImageError": "ultrastyle.io.images",
    "optimize": "ultrastyle.optimization.run",
    "optimize_batch": "ultrastyle.optimization.batch",
    "Optimizer": "ultrastyle.optimization.run",
    "OptimizeOptions": "ultrastyle.optimization.run",
    "make_optimize_options": "ultrastyle.optimization.run",
    "export_model": "ultrastyle.deploy",
    "calibrate": "ultrastyle.deploy",
    "check_tensorrt": "ultrastyle.deploy",
    "build_tensorrt": "ultrastyle.deploy",
    "BundleError": "ultrastyle.export.bundle",
    "BundleBusy": "ultrastyle.export.bundle",
    "ExportValidationError": "ultrastyle.export.errors",
    "CalibrationError": "ultrastyle.calibration.quantize",
    "CalibrationDataError": "ultrastyle.calibration.data",
    "CalibrationWarning": "ultrastyle.calibration.quantize",
    "BuildError": "ultrastyle.trt.build",
    "GraphError": "ultrastyle.trt.graphs",
    # Training, as `ultrastyle distill` and `train-decoder` (resume=True continues a run); not "distill", the subpackage's name.
    "distill_encoder": "ultrastyle.distill.jobs:distill",
    "train_decoder": "ultrastyle.distill.jobs",
    "DistillConfig": "ultrastyle.distill.config",
    "DecoderConfig": "ultrastyle.distill.config",
    "ConfigError": "ultrastyle.distill.config",
    "TrainingError": "ultrastyle.distill.trainer",
    "TrainingInterrupted": "ultrastyle.distill.jobs",
    "OutputError": "ultrastyle.distill.outputs",
    "DataError": "ultrastyle.distill.data",
    "JobResult": "ultrastyle.distill.jobs",
    # The model zoo, as `ultrastyle models` (MODULE:NAME where the public name is not the module's).
    "fetch_model": "ultrastyle.models.zoo:fetch",
    "import_model": "ultrastyle.models.zoo:import_local",
    "verify_model": "ultrastyle.models.zoo:verify",
    "model_status": "ultrastyle.models.zoo:install_status",
    "list_models": "ultrastyle.models.zoo:entries",
    "remove_model": "ultrastyle.models.zoo:remove",
    "model_path": "ultrastyle.models.zoo:model_dir",
    # The set-up, as `ultrastyle doctor` (the module is "checkup": "doctor" is the function).
    "doctor": "ultrastyle.checkup",
    "ready": "ultrastyle.checkup",
    "Check": "ultrastyle.checkup",
}
if TYPE_CHECKING:  # what type checkers and IDEs see: each name typed, re-exported explicitly (`X as X`); at run time each loads on first use
    from ultrastyle.api import ClusterStylizer as ClusterStylizer
    from ultrastyle.api import ImageLike as ImageLike
    from ultrastyle.api import OptionError as OptionError
    from ultrastyle.api import Stylizer as Stylizer
    from ultrastyle.api import load as load
    from ultrastyle.api import make_options as make_options
    from ultrastyle.api import stylize as stylize
    from ultrastyle.api import stylize_batch as stylize_batch
    from ultrastyle.calibration.data import CalibrationDataError as CalibrationDataError
    from ultrastyle.calibration.quantize import CalibrationError as CalibrationError
    from ultrastyle.calibration.quantize import CalibrationWarning as CalibrationWarning
    from ultrastyle.checkup import Check as Check
    from ultrastyle.checkup import doctor as doctor
    from ultrastyle.checkup import ready as ready
    from ultrastyle.core.plan import TileWarning as TileWarning
    from ultrastyle.deploy import build_tensorrt as build_tensorrt
    from ultrastyle.deploy import calibrate as calibrate
    from ultrastyle.deploy import check_tensorrt as check_tensorrt
    from ultrastyle.deploy import export_model as export_model
    from ultrastyle.distill.config import ConfigError as ConfigError
    from ultrastyle.distill.config import DecoderConfig as DecoderConfig
    from ultrastyle.distill.config import DistillConfig as DistillConfig
    from ultrastyle.distill.data import DataError as DataError
    from ultrastyle.distill.jobs import JobResult as JobResult
    from ultrastyle.distill.jobs import TrainingInterrupted as TrainingInterrupted
    from ultrastyle.distill.jobs import distill as distill_encoder
    from ultrastyle.distill.jobs import train_decoder as train_decoder
    from ultrastyle.distill.outputs import OutputError as OutputError
    from ultrastyle.distill.trainer import TrainingError as TrainingError
    from ultrastyle.distributed.cluster import ClusterError as ClusterError
    from ultrastyle.errors import RunnerError as RunnerError
    from ultrastyle.export.bundle import BundleBusy as BundleBusy
    from ultrastyle.export.bundle import BundleError as BundleError
    from ultrastyle.export.errors import ExportValidationError as ExportValidationError
    from ultrastyle.io.images import ImageError as ImageError
    from ultrastyle.models.convert import CheckpointError as CheckpointError
    from ultrastyle.models.defaults import ModelDefaults as ModelDefaults
    from ultrastyle.models.errors import ZooError as ZooError
    from ultrastyle.models.registry import UnknownModelError as UnknownModelError
    from ultrastyle.models.zoo import entries as list_models
    from ultrastyle.models.zoo import fetch as fetch_model
    from ultrastyle.models.zoo import import_local as import_model
    from ultrastyle.models.zoo import install_status as model_status
    from ultrastyle.models.zoo import model_dir as model_path
    from ultrastyle.models.zoo import remove as remove_model
    from ultrastyle.models.zoo import verify as verify_model
    from ultrastyle.optimization.batch import optimize_batch as optimize_batch
    from ultrastyle.optimization.run import OptimizeOptions as OptimizeOptions
    from ultrastyle.optimization.run import Optimizer as Optimizer
    from ultrastyle.optimization.run import make_optimize_options as make_optimize_options
    from ultrastyle.optimization.run import optimize as optimize
    from ultrastyle.runtime.pairs import BatchInterrupted as BatchInterrupted
    from ultrastyle.runtime.pairs import BatchSummary as BatchSummary
    from ultrastyle.runtime.pairs import OutputCollisionError as OutputCollisionError
    from ultrastyle.runtime.pairs import PairResult as PairResult
    from ultrastyle.trt.build import BuildError as BuildError
    from ultrastyle.trt.graphs import GraphError as GraphError

# A literal list, as type checkers read it (pyright: the aliased names above are public only through it); equal to
# ["__version__", *_API] (tests/test_imports.py).
__all__ = [
    "__version__", "stylize", "stylize_batch", "load", "Stylizer", "ClusterStylizer", "ImageLike", "make_options",
    "ModelDefaults", "OptionError", "RunnerError", "ZooError", "UnknownModelError", "CheckpointError", "ClusterError",
    "BatchSummary", "BatchInterrupted", "PairResult", "OutputCollisionError", "TileWarning", "ImageError", "optimize",
    "optimize_batch", "Optimizer", "OptimizeOptions", "make_optimize_options", "export_model", "calibrate", "check_tensorrt",
    "build_tensorrt", "BundleError", "BundleBusy", "ExportValidationError", "CalibrationError", "CalibrationDataError",
    "CalibrationWarning", "BuildError", "GraphError", "distill_encoder", "train_decoder", "DistillConfig", "DecoderConfig",
    "ConfigError", "TrainingError", "TrainingInterrupted", "OutputError", "DataError", "JobResult", "fetch_model",
    "import_model", "verify_model", "model_status", "list_models", "remove_model", "model_path", "doctor", "ready", "Check",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _API:
        module, _, attr = _API[name].partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ultrastyle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
