"""Crafted files that once hung a run, passed the size limits, or swapped a verified model: each is one clear error."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from ultrastyle.io.images import ImageError, read_image


def _looped_tiff(path) -> None:
    """Two pages whose second directory points back to the first: a chain of pages without an end."""
    import tifffile

    tifffile.imwrite(path, np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb", metadata=None)
    with tifffile.TiffFile(path) as t:
        offsets = [p.offset for p in t.pages]
    b = bytearray(path.read_bytes())
    n = struct.unpack_from("<H", b, offsets[1])[0]
    struct.pack_into("<I", b, offsets[1] + 2 + 12 * n, offsets[0])
    path.write_bytes(bytes(b))


def test_a_tiff_whose_pages_loop_is_read_not_followed_forever(tmp_path):
    p = tmp_path / "loop.tif"
    _looped_tiff(p)
    code = f"from ultrastyle.io.images import read_image, tiff_pages; print(tiff_pages({str(p)!r}), read_image({str(p)!r}).shape)"
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60)  # hung forever before
    assert r.returncode == 0 and r.stdout.split("\n")[0] == "2 (8, 8, 3)", r.stderr


@pytest.mark.parametrize(("samples", "dtype"), [(32, "float64"), (6, "uint8")])
def test_a_tiff_of_more_samples_than_an_image_has_is_refused_before_its_pixels_are_decoded(tmp_path, monkeypatch, samples, dtype):
    import tifffile

    p = tmp_path / "many.tif"
    tifffile.imwrite(p, np.zeros((64, 64, samples), dtype), photometric="minisblack", planarconfig="contig", metadata=None)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))  # 4 GiB for a 4 MB file once
    with pytest.raises(ImageError, match=rf"many\.tif: a TIFF of {samples} samples per pixel; images of at most 4 samples"):
        read_image(p)


def test_a_bundle_graph_keeping_its_weights_in_another_file_is_refused(cd16x_dir, tmp_path):
    """The manifest's sha256 covers the graph file only: weights in an external data file changed unseen."""
    import json

    import onnx

    from ultrastyle.export.bundle import BundleError, export_bundle, read_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.io.digest import sha256_file
    from ultrastyle.models.pretrained import load_cd_folder

    b = export_bundle(load_cd_folder(cd16x_dir, stages=(1,)), tmp_path / "b", validate=False, spec=ExportSpec(stages=(1,)))
    read_bundle(b.path)  # clean: each graph is remembered by its sha256, so the crafted one below is a new content, scanned
    graph = b.path / b.manifest["networks"]["encoder1"]["file"]
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, location="enc1.data", size_threshold=0)
    manifest = json.loads((b.path / "manifest.json").read_text())
    manifest["networks"]["encoder1"]["sha256"] = sha256_file(graph)  # as a crafted bundle would record it
    (b.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"encoder1\.onnx: tensor '.*' keeps its data in another file \(enc1\.data\)"):
        read_bundle(b.path)


@pytest.mark.parametrize("field", ["stage", "widths"])
def test_a_manifest_with_crafted_fields_is_one_bundle_error_not_a_traceback(cd16x_dir, tmp_path, field):
    import json

    from ultrastyle.export.bundle import BundleError, export_bundle, read_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder

    b = export_bundle(load_cd_folder(cd16x_dir, stages=(1,)), tmp_path / "b", validate=False, spec=ExportSpec(stages=(1,)))
    manifest = json.loads((b.path / "manifest.json").read_text())
    if field == "stage":
        manifest["networks"]["encoder1"]["stage"] = [1]  # unhashable: a TypeError once
        said = "the graph encoder1 has no stage number"
    else:
        manifest["architecture"]["widths"] = [1e400] * 5  # int(inf): an OverflowError once
        said = "its 'architecture' record cannot be read"
    (b.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=said):
        read_bundle(b.path)


def test_a_training_config_of_nested_yaml_aliases_is_refused_by_its_type_not_expanded(tmp_path):
    """Billion laughs: 420 bytes of YAML aliases gave a 58 MB error line (and 1.2 GB of memory) through str() and repr()."""
    from ultrastyle.distill.config import ConfigError, DistillConfig

    lines = ["images: &top", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 strings if expanded
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        DistillConfig.from_file(tmp_path / "laughs.yaml")
    assert str(info.value).endswith("images: expected str, got a dict") and len(str(info.value)) < 300
    (tmp_path / "long.yaml").write_text("steps: " + "x" * 10_000 + "\n")
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'x{70,}\.\.\.$"):
        DistillConfig.from_file(tmp_path / "long.yaml")


def test_only_the_documented_formats_stream_through_libvips(tmp_path):
    """libvips renders SVG (fetching images it names), PDF, HEIF...: with --streaming always an SVG was stylized."""
    pyvips = pytest.importorskip("pyvips", reason="streaming reads need pyvips (pip install 'ultrastyle[vips]')")
    from ultrastyle.io.stream import open_stream, stream_blocker

    svg = tmp_path / "x.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect width="64" height="48" fill="red"/></svg>')
    try:
        pyvips.Image.new_from_file(str(svg))
    except pyvips.Error:
        pytest.skip("this libvips has no SVG loader to refuse")
    assert stream_blocker(svg) == "libvips reads it with svgload; JPEG, PNG, TIFF, WebP and GIF are streamed"
    with pytest.raises(ImageError, match=r"x\.svg: not streamed: libvips reads it with svgload"):
        open_stream(svg, max_pixels=10**8)
    with pytest.raises(ImageError, match=r"x\.svg: not an image file PIL can read"):
        read_image(svg)  # where a blocked file goes


def test_a_tiff_pillow_reads_keeps_being_read_whatever_its_extra_samples_and_orientation(tmp_path):
    """The samples check refused a turned RGB TIFF with extra samples, which Pillow reads (and did before)."""
    import tifffile

    a = (np.random.default_rng(0).random((16, 24, 5)) * 255).astype(np.uint8)
    p = tmp_path / "extra.tif"
    tifffile.imwrite(p, a, photometric="rgb", extrasamples=(0, 0), metadata=None, extratags=[(274, "H", 1, 6, True)])
    got = read_image(p)
    assert got.shape == (24, 16, 3)  # turned by its orientation tag (6: a quarter turn clockwise)


def test_a_yaml_alias_bomb_in_the_stage_key_is_refused_by_type(tmp_path):
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    lines = ["stage: &top", "  - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (tmp_path / "stages.yaml").write_text("\n".join(lines) + "\n")
    r = CliRunner().invoke(app, ["distill", "-c", str(tmp_path / "stages.yaml"), "-t", "cd-wct-16x", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "stage: expected stage numbers 1..5, got a list holding a list" in " ".join(r.output.split())
    assert len(r.output) < 1000


def test_a_bundle_opened_again_needs_no_onnx(cd16x_dir, tmp_path):
    """Its graphs' external-data scan needs onnx (0.8 s to import, on every run once): a graph found clean is remembered by
    its sha256 under $ULTRASTYLE_HOME, so a later process opens the bundle and stylizes without importing onnx."""
    import os
    import subprocess
    import sys

    from ultrastyle.export.bundle import export_bundle
    from ultrastyle.export.spec import ExportSpec
    from ultrastyle.models.pretrained import load_cd_folder

    b = export_bundle(load_cd_folder(cd16x_dir, stages=(5,)), tmp_path / "b", validate=False, spec=ExportSpec(stages=(5,)))
    probe = ("import sys, numpy as np, ultrastyle\n"
             f"with ultrastyle.load({str(b.path)!r}, levels=(5,), progress=False) as s:\n"
             "    s.stylize(np.zeros((40, 40, 3), np.uint8), np.full((40, 40, 3), 99, np.uint8))\n"
             "print(sorted(m for m in ('onnx', 'ml_dtypes') if m in sys.modules))")  # fmt: skip
    env = dict(os.environ)  # this test's $ULTRASTYLE_HOME: nothing remembered yet
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0 and "'onnx'" in first.stdout.splitlines()[-1], first.stderr  # the first open scans
    again = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.strip().endswith("[]"), again.stderr
