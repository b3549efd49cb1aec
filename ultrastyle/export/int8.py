"""A bundle's int8 (Q/DQ) graphs, as calibration records them in its manifest.

``ultrastyle calibrate`` (`calibration.quantize`) writes them beside the
float32 graphs and records ``networks[name]["int8"] = {"file", "sha256",
"source_sha256", ...}`` and the settings under ``"calibration"``. The
backends that run them (ONNX Runtime, TensorRT's graph sources) read them
here, below both: reading a bundle needs no calibration code.
"""

from __future__ import annotations

from pathlib import Path

from ultrastyle.errors import Placeholder, Remedy, remedied
from ultrastyle.export.bundle import Bundle, BundleError, refuse_external_data
from ultrastyle.io.digest import sha256_file


def calibrated_activations(manifest: dict) -> str:
    """The activation type of a bundle's int8 graphs (calibration version 1 wrote signed graphs only)."""
    return (manifest.get("calibration") or {}).get("activations", "int8")


# What `recalibrate` repeats of a recorded calibration: what changes the graphs most (activations: whether TensorRT
# builds them; a repair that dropped them turned a TensorRT-ready bundle's int8 activations into uint8).
_REPEATED = ("activations", "method", "keep_float")


def recalibrate(bundle: Bundle, network: str | None = None, **settings: object) -> Remedy:
    """The calibration that makes ``bundle``'s int8 graphs again (``network``'s, by its own record; else the latest run's):
    with the activations, method, layers kept in float (and percentile, for that method) they were made with, ``settings``
    over them."""
    entry = bundle.manifest.get("networks", {}).get(network) if network else None
    own = (entry.get("int8") or {}).get("settings") if isinstance(entry, dict) and isinstance(entry.get("int8"), dict) else None
    recorded = own if isinstance(own, dict) else bundle.manifest.get("calibration") or {}
    kwargs = {"activations": calibrated_activations(bundle.manifest), **{k: recorded[k] for k in _REPEATED if k in recorded}}
    if kwargs.get("method") == "percentile" and "percentile" in recorded:
        kwargs["percentile"] = recorded["percentile"]
    return Remedy("calibrate", (str(bundle.path), Placeholder("YOUR_PHOTOS/")), tuple({**kwargs, **settings}.items()))


def calibrate_more(bundle: Bundle, stages: list[int]) -> Remedy:
    """The calibration that adds int8 graphs for ``stages`` to ``bundle``, with its graphs' activations (a mix is refused)."""
    kwargs = (("stages", list(stages)), ("activations", calibrated_activations(bundle.manifest)))
    return Remedy("calibrate", (str(bundle.path), Placeholder("YOUR_PHOTOS/")), kwargs)


def int8_graph(bundle: Bundle, network: str) -> dict | None:
    """The network's Q/DQ graph entry (``{"file", "sha256"}``) if calibration stored one."""
    entry = bundle.manifest["networks"].get(network, {}).get("int8")
    return entry if isinstance(entry, dict) and "file" in entry else None


def int8_networks(bundle: Bundle) -> dict[str, Path]:
    """network name -> its Q/DQ graph, for the networks calibration quantized (checked against its sha256).

    A missing, modified or stale graph raises `BundleError` with the command that remakes it.
    """
    out = {}
    for name, entry in bundle.manifest["networks"].items():
        q = entry.get("int8") if isinstance(entry, dict) else None
        if not q:
            continue
        fix = recalibrate(bundle, name)
        path = bundle.path / Path(q["file"]).name
        if not path.is_file():
            raise remedied(BundleError(f"{path}: the int8 graph of {name} is missing; calibrate again: {fix.python()}"), fix)
        if sha256_file(path) != q["sha256"]:
            raise remedied(BundleError(f"{path}: sha256 does not match the manifest's; the int8 graph was modified, calibrate again: {fix.python()}"), fix)
        if q.get("source_sha256") not in (None, entry["sha256"]):
            raise remedied(BundleError(f"{path}: calibrated from another {name} graph than the bundle's; calibrate again: {fix.python()}"), fix)
        refuse_external_data(path, q["sha256"])
        out[name] = path
    return out
