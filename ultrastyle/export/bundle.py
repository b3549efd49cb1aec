"""Bundles: a folder with ``manifest.json`` and one ONNX graph per stage network.

``export_bundle`` writes one from a `StyleModel` and validates every graph
against PyTorch; ``read_bundle`` checks the format version and every graph's
sha256 before anything runs it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ultrastyle._version import __version__
from ultrastyle.errors import Placeholder, Remedy, Setting, remedied
from ultrastyle.export.spec import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, SUPPORTED_OPSETS, ExportSpec
from ultrastyle.io.atomic import atomic_dir, sweep_stale, writer_pid
from ultrastyle.models.pretrained import StyleModel
from ultrastyle.models.registry import is_zoo_name
from ultrastyle.io.digest import sha256_file
from ultrastyle.core.arch import ArchSpec
from ultrastyle.core.arch import spec_from_dict as arch_from_dict
from ultrastyle.core.arch import spec_to_dict as arch_to_dict
from ultrastyle.core.receptive import decoder_radius, encoder_radius, stage_radius

if TYPE_CHECKING:
    import onnx

MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be used: says what was expected, what was found, and what to do."""


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk."""

    path: Path
    manifest: dict

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(self.manifest["stages"])

    @property
    def arch(self) -> ArchSpec:
        return arch_from_dict(self.manifest["architecture"])

    def graph_path(self, name: str) -> Path:
        return self.path / self.manifest["networks"][name]["file"]

    def stages_problem(self, stages: Iterable[int]) -> str | None:
        """Why this bundle cannot serve ``stages``: those it lacks and those it has (None: it can). Callers raise their own error."""
        missing = sorted(set(stages) - set(self.stages))
        return f"bundle {self.path} has no stage(s) {missing}; it has {list(self.stages)}" if missing else None


class BundleTargetError(BundleError):
    """An output folder that cannot take a bundle (it holds something else, or a file stands in its path)."""


def check_bundle_target(out_dir: str | Path, *, force: bool = False) -> None:
    """`BundleTargetError` unless ``out_dir`` can take a bundle: absent, an empty folder, or a bundle (replaced); one
    holding int8 graphs or TensorRT engines (work that takes minutes to redo) only with ``force``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (_manifest_format(out_dir) == BUNDLE_FORMAT or _damaged_bundle(out_dir)
                                 or (out_dir.is_dir() and not any(out_dir.iterdir()))):  # fmt: skip
        why = " (its manifest.json is not an ultrastyle bundle's)" if is_bundle(out_dir) else ""
        raise BundleTargetError(f"{out_dir.resolve()} exists and is not a bundle{why}; choose a new or empty folder for the bundle")
    if others := _not_the_bundles(out_dir):  # the export replaces the whole folder
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise BundleTargetError(f"{out_dir.resolve()} is a bundle that also holds files that are not the bundle's ({shown}), which "
                                "exporting over it would delete; move them away, or export into a new folder")  # fmt: skip
    if not force and (work := derived_work(out_dir)):
        raise remedied(BundleTargetError(f"{out_dir.resolve()} is a bundle holding {work}, which exporting over it would delete "
                                         "(calibrating and building make them again); export into a new folder, or replace "
                                         "them (force=True)"), Setting("force", True))  # fmt: skip
    for parent in out_dir.absolute().parents:  # the nearest existing folder above must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise BundleTargetError(f"cannot create the bundle folder {out_dir}: {parent} is a file, not a folder")
            break


def export_bundle(
    model: StyleModel,
    out_dir: str | Path,
    *,
    spec: ExportSpec = ExportSpec(),
    source_weights: dict[str, str] | None = None,
    validate: bool = True,
    on_network: Callable[[str], None] | None = None,
    force: bool = False,
) -> Bundle:
    """Write ``model``'s stage networks as ONNX graphs plus a manifest into ``out_dir``.

    The bundle is assembled in a temporary folder beside ``out_dir`` and renamed
    into place, so a failed export (a validation error, say) leaves nothing.
    ``source_weights`` maps weight file names to their sha256. ``force``: replace a bundle holding int8 graphs or
    engines (`check_bundle_target`). `BundleBusy` while another process calibrates or exports that bundle.
    """
    out_dir = Path(out_dir).resolve()
    try:
        with bundle_in_use(out_dir):  # a calibration running there lost its graphs to the swap, and said done
            return _export(model, out_dir, spec, source_weights, validate, on_network, force)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):  # said with no file name ("[Errno 28] ...")
            raise BundleError(f"{out_dir}: cannot write the bundle ({exc.strerror}); nothing of it was left there") from exc
        raise


def _export(model: StyleModel, out_dir: Path, spec: ExportSpec, source_weights: dict[str, str] | None, validate: bool,
            on_network: Callable[[str], None] | None, force: bool) -> Bundle:  # fmt: skip
    import onnx

    from ultrastyle.export.graph import build_graph
    from ultrastyle.export.validate import validate_network

    if spec.opset not in SUPPORTED_OPSETS:
        raise BundleError(
            f"opset {spec.opset} is not supported; use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {ExportSpec().opset})"
        )
    check_bundle_target(out_dir, force=force)
    missing = [k for k in spec.stages if k not in model.encoders]
    if missing:
        raise BundleError(f"model {model.name} has no stage(s) {missing}; it has {list(model.stages)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)  # temp folders of exports killed before they finished
    # Written into a temp folder then swapped in by renames, so the folder never lacks graphs it lists.
    with atomic_dir(out_dir) as tmp:
        arch = model.arch
        networks = {}
        report = {}
        if "encoder_aux" in spec.kinds and not all(hasattr(model.encoders[k], "conv11_aux") for k in spec.stages):
            raise BundleError(f"model {model.name} was loaded without its aux layers (Q_k); load it with aux=True")
        embeds = {k: tuple(q.cout for q in arch.aux_layers(k)) for k in spec.stages} if arch.teacher_widths else None
        for ns in spec.networks({k: arch.feature_channels(k) for k in spec.stages}, embeds):
            if on_network:
                on_network(ns.name)
            net = model.encoders[ns.stage] if ns.kind.startswith("encoder") else model.decoders[ns.stage]
            graph = build_graph(net, ns, opset=spec.opset, doc=f"{model.name} {ns.name}")
            onnx.save(graph, tmp / ns.file)
            if validate:
                report[ns.name] = validate_network(tmp / ns.file, net, ns, arch.grid(ns.stage), spec.check_cells)
            networks[ns.name] = {
                "file": ns.file,
                "sha256": sha256_file(tmp / ns.file),
                "kind": ns.kind,
                "stage": ns.stage,
                "grid": arch.grid(ns.stage),
                "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ns.inputs],
                "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in ns.outputs],
            }
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "ultrastyle_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model.name,
            "architecture": arch_to_dict(arch),
            "stages": list(spec.stages),
            # The source model's method/levels/alpha (`ultrastyle.models.defaults`), when known.
            **({"defaults": model.defaults.restricted(spec.stages).to_dict()} if model.defaults else {}),
            "opset": spec.opset,
            "input_range": [0.0, 1.0],
            "normalisation": "folded into conv0 of every encoder",
            "receptive_fields": {
                str(k): {"grid": arch.grid(k), "encoder_px": encoder_radius(arch, k),
                         "decoder_features": decoder_radius(arch, k), "stage_px": stage_radius(arch, k)}
                for k in spec.stages
            },  # fmt: skip
            "source_weights": dict(sorted((source_weights or {}).items())),
            "networks": networks,
            "validation": report,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return Bundle(out_dir, manifest)


class BundleBusy(BundleError):
    """Another process calibrates or exports over this bundle now."""


@contextlib.contextmanager
def bundle_in_use(path: Path) -> Iterator[None]:
    """An exclusive lock on the bundle folder ``path`` (where it exists) while it is calibrated or exported over:
    `BundleBusy` while another process holds it. The lock is on the folder itself (flock): no file is left behind, and
    a dead process's lock goes with it. Where the file system has none (NFS gives EBADF, Lustre ENOSYS) or on
    Windows, unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    if fcntl is None or not path.is_dir():
        yield
        return
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # gone since: nothing there to keep from another writer
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BundleBusy(f"{path}: another process is calibrating or exporting this bundle; wait for it to end, then run "
                             "again") from None  # fmt: skip
        except OSError:  # no flock here: unlocked
            pass
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # an export swapped the folder in between: the lock is on the old one; lock the new
    else:
        raise BundleBusy(f"{path}: replaced again and again while this waited to lock it; run again")
    try:
        yield
    finally:
        os.close(fd)


def load_graph(path: str | Path) -> onnx.ModelProto:
    """``onnx.load(path)``; a file that is not an ONNX protobuf raises `BundleError` naming it (not protobuf's DecodeError)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path))
    except DecodeError as exc:
        raise BundleError(f"{path}: not an ONNX graph ({exc}); export the model again") from None


def read_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle: format and version checked, every graph's sha256 verified."""
    if os.fspath(path) == "":  # Path("") is the current folder: "./: not a bundle" would hide the cause
        raise BundleError("an empty bundle path (an unset shell variable?); give the folder that export made")
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        if path.exists() and not path.is_dir():
            raise BundleError(f"{path}: a file, not a bundle folder; give the folder that export made")
        fresh = not path.exists() or not any(path.iterdir())  # export writes there; anything else it refuses
        fix = Remedy("export_model", (Placeholder("MODEL"), str(path) if fresh else Placeholder("NEW_FOLDER")))
        why = "no such folder" if not path.exists() else f"not a bundle (no {MANIFEST})"
        raise remedied(BundleError(f"{path}: {why}; create one with {fix.python()}"), fix)
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        again = Remedy("export_model", (Placeholder("MODEL"), str(path)), (("force", True),) if derived_work(path) else ())
        raise remedied(BundleError(f"{mf}: unreadable manifest ({exc}); {_export_again(path, again)}"), again) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mf}: expected format {BUNDLE_FORMAT!r}, found {found!r}")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{mf}: bundle format version {version} is newer than this ultrastyle ({__version__}) reads "
            f"(up to {BUNDLE_FORMAT_VERSION}); upgrade ultrastyle or re-export the bundle with this version"
        )
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        again = remake(path, manifest)
        raise remedied(BundleError(f"{mf}: format_version {version!r} is none this ultrastyle knows (1..{BUNDLE_FORMAT_VERSION}); "
                                   f"{_export_again(path, again)}"), again)  # fmt: skip
    _check_manifest(path, manifest)
    if verify:
        again = remake(path, manifest)
        for name, n in manifest["networks"].items():
            f = path / n["file"]
            if not f.is_file():
                raise remedied(BundleError(f"{f}: graph {name} listed in the manifest is missing; {_export_again(path, again)}"), again)
            found = sha256_file(f)
            if found != n["sha256"]:
                raise remedied(BundleError(
                    f"{f}: sha256 {found} does not match the manifest's {n['sha256']}: "
                    f"the graph was modified or corrupted; {_export_again(path, again)}"
                ), again)
            refuse_external_data(f, found)
    return Bundle(path, manifest)


def refuse_external_data(graph: Path, digest: str | None = None) -> None:
    """`BundleError` for a graph whose weights lie in another file (ONNX external data): the manifest's sha256 covers
    the graph file alone, so those weights could change unseen. Exports never write external data.

    ``digest``: the graph's sha256, just checked: a graph found clean is remembered by it (`_checked_marker`), so that
    opening a bundle again needs no onnx (its import alone took 0.8 s of every run).
    """
    marker = _checked_marker(digest)
    if marker is not None and marker.is_file():
        return
    if _scan_external_data(graph) and marker is not None:  # not ONNX at all: no mark, the runtime that opens it says why
        with contextlib.suppress(OSError):  # a cache: where it cannot be written, the next open scans again
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _checked_marker(digest: str | None) -> Path | None:
    """``$ULTRASTYLE_HOME/cache/graphs-checked/v1/SHA256``: present once a graph of that content was scanned and found
    clean (``v1``: this scan; a stricter one gets a new folder)."""
    from ultrastyle.models.zoo import ZooError, home_dir

    if digest is None:
        return None
    try:
        return home_dir() / "cache" / "graphs-checked" / "v1" / digest
    except ZooError:  # a relative $ULTRASTYLE_HOME: no cache, every open scans
        return None


def _scan_external_data(graph: Path) -> bool:
    """`refuse_external_data`'s scan; whether ``graph`` parsed as ONNX (and so was scanned)."""
    import onnx

    def tensors(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in g.node:
            for a in node.attribute:
                yield from ([a.t] if a.HasField("t") else [])
                yield from a.tensors
                for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield from (sparse.values, sparse.indices)
                for sub in [a.g] if a.HasField("g") else list(a.graphs):
                    yield from tensors(sub)

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX: the runtime that opens it says so, as before
        return False
    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            where = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise BundleError(f"{graph}: tensor {t.name!r} keeps its data in another file ({where}), which the bundle's sha256 "
                              "does not cover; export the model again (exports keep every weight in the graph)")  # fmt: skip
    return True


def _check_manifest(path: Path, manifest: dict) -> None:
    """`BundleError` for a manifest whose entries are not what `export_bundle` and `calibrate` write (an edited or damaged one):
    its networks, their files (in the bundle folder) and hashes, the architecture and stages."""
    mf = path / MANIFEST

    def bad(what: str) -> BundleError:
        again = remake(path, manifest)
        return remedied(BundleError(f"{mf}: {what}; {_export_again(path, again)}"), again)

    networks = manifest.get("networks")
    if not isinstance(networks, dict) or not networks:
        raise bad(f"expected 'networks' to map graph names to their files, found {type(networks).__name__}")
    try:
        arch_from_dict(manifest.get("architecture"))  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise bad(f"its 'architecture' record cannot be read ({type(exc).__name__}: {exc})") from None
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(k, int) and 1 <= k <= 5 for k in stages):
        raise bad(f"expected 'stages' to list stages 1..5, found {stages!r}")
    if bad_stage := [name for name, n in networks.items() if not isinstance(n, dict) or not isinstance(n.get("stage"), int)]:
        raise bad(f"the graph {bad_stage[0]} has no stage number")
    have = {n["stage"] for n in networks.values()}
    if lacking := sorted(set(stages) - have):
        raise bad(f"'stages' lists {lacking}, which no graph is of")
    if "calibration" in manifest and not isinstance(manifest["calibration"], dict):
        raise bad("its 'calibration' record is not a record")
    for name, n in networks.items():
        records = [("graph", n)] + ([("int8 graph", n["int8"])] if isinstance(n, dict) and n.get("int8") else [])
        for what, r in records:
            if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r.get(k) for k in ("file", "sha256")):
                raise bad(f"the {what} of {name} lacks its file or sha256")
            if Path(r["file"]).name != r["file"]:  # graphs live in the bundle folder, nowhere else
                raise BundleError(f"{mf}: {what} {name} names a file outside the bundle: {r['file']!r}")


def remake(path: str | Path, manifest: dict) -> Remedy:
    """The export that makes the bundle at ``path`` again, over it: from its zoo model, or MODEL for a weights folder.

    The manifest records a weights folder by its name only, which is no path to export from.
    """
    from ultrastyle.models.registry import entries

    made_from = manifest.get("model")
    model = made_from if isinstance(made_from, str) and made_from in entries() else Placeholder("MODEL")
    stages, opset = manifest.get("stages"), manifest.get("opset")
    kwargs = (("stages", list(stages)),) if isinstance(stages, list) and stages and all(isinstance(k, int) for k in stages) else ()
    kwargs += (("opset", opset),) if isinstance(opset, int) and opset != ExportSpec().opset else ()
    networks = manifest.get("networks")
    kwargs += (("aux", True),) if isinstance(networks, dict) and any(isinstance(n, dict) and n.get("kind") == "encoder_aux"
                                                                     for n in networks.values()) else ()  # fmt: skip
    kwargs += (("force", True),) if derived_work(Path(path)) else ()  # its int8 graphs and engines, which `_export_again` names
    return Remedy("export_model", (model, str(path)), kwargs)  # the same bundle: its stages and opset


def _export_again(path: Path, again: Remedy) -> str:
    """The advice to export the bundle at ``path`` again (`remake`), naming the calibration and engines that deletes."""
    lost = derived_work(path)
    return f"export the bundle again{f', which deletes its {lost} (made again after it)' if lost else ''}: {again.python()}"


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is meant as a bundle: it holds a manifest (`read_bundle` says what is wrong with it, if anything).
    A zoo model's name never is (`is_zoo_name`), whatever folder of that name the working directory holds."""
    return not is_zoo_name(path) and (Path(path) / MANIFEST).is_file()


def _damaged_bundle(path: Path) -> bool:
    """A bundle whose manifest cannot be read: that manifest beside ONNX graphs (and their engines), nothing else."""
    if not is_bundle(path) or _manifest_format(path) is not None:
        return False
    entries = [p for p in path.iterdir() if p.name != MANIFEST]
    return bool(entries) and all(p.suffix == ".onnx" or p.name == "engines" for p in entries)


def derived_work(path: Path) -> str:
    """What a bundle folder holds beyond its float graphs: ``"3 int8 graphs and TensorRT engines"``, or ``""``."""
    if not path.is_dir() or not is_bundle(path):
        return ""
    int8 = sum(1 for p in path.glob("*.int8.onnx") if writer_pid(p) is None)
    engines = (path / "engines").is_dir() and any((path / "engines").iterdir())
    said = [f"{int8} int8 graph{'s' if int8 > 1 else ''}"] if int8 else []
    return " and ".join(said + (["TensorRT engines"] if engines else []))


def _not_the_bundles(path: Path) -> list[str]:
    """Names in a bundle folder that are neither its manifest, its graphs (float or int8, listed or not) nor its engines."""
    if not path.is_dir() or not is_bundle(path):
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if p.name not in (MANIFEST, "engines", *DESKTOP_FILES) and not p.name.endswith(".onnx") and writer_pid(p) is None)  # fmt: skip


# What file browsers leave in a folder they show: not the user's work, replaced with the bundle.
DESKTOP_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def _manifest_format(path: Path) -> str | None:
    """The ``format`` a folder's manifest declares; None without a readable JSON manifest (another program's folder, say)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None
