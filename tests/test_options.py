"""One rule per keyword: `api.make_options` and `optimization.run.make_optimize_options` resolve the settings both take alike.

Both call the validators of `ultrastyle.options`; every case runs through both
resolvers and must give the same outcome: the same resolved value, or the same
`OptionError` (its ``option`` the keyword, its message the same words, no CLI flag).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ultrastyle.api
import ultrastyle.options
from ultrastyle.api import OptionError, make_options
from ultrastyle.models.defaults import ModelDefaults
from ultrastyle.optimization.run import Optimizer, make_optimize_options

DEFAULTS = ModelDefaults("wct", (5, 4), 0.6)


def _stylize(**kw):
    o = make_options(DEFAULTS, **kw)
    return {"max_memory": o.tiling.max_memory, "tile": o.tiling.tile, "content_size": o.content_size, "style_size": o.style_size,
            "max_pixels": o.max_pixels, "format": o.format}  # fmt: skip


def _optimize(**kw):
    o = make_optimize_options(**kw)
    return {"max_memory": o.max_memory, "tile": o.tile, "content_size": o.content_size, "style_size": o.style_size,
            "max_pixels": o.max_pixels, "format": o.format}  # fmt: skip


RESOLVERS = {"make_options": _stylize, "make_optimize_options": _optimize}

# (keyword, value, the resolved value, or None where it must be refused)
ACCEPTED = [
    ("tile", "auto", None),  # the review's case: make_optimize_options raised a bare TypeError
    ("tile", " AUTO ", None),
    ("tile", "64", 64),
    ("tile", 8, 8),  # below a grid: the planners round it up
    ("tile", np.int64(48), 48),
    ("style_size", 0, 0),  # the review's case: make_optimize_options refused it; 0 keeps the style's own size
    ("style_size", 16, 16),
    ("content_size", 0, 0),
    ("content_size", np.int32(256), 256),
    ("max_memory", "1.5GiB", 3 * 2**29),
    ("max_memory", 2**20, 2**20),
    ("max_memory", None, None),
    ("max_pixels", 1, 1),
    ("format", "JPEG", "jpg"),
    ("format", "tif", "tiff"),
]
REFUSED = [
    ("max_pixels", -5),  # the review's case: make_optimize_options took it
    ("max_pixels", 0),
    ("max_pixels", 2.5e6),
    ("content_size", 1.5),  # the review's case: make_optimize_options took it
    ("content_size", -1),
    ("content_size", "256"),
    ("style_size", -1),
    ("style_size", 64.0),
    ("max_memory", "0"),  # the review's case: make_options returned a budget of 0
    ("max_memory", 0),
    ("max_memory", "0.4B"),  # parses to 0 bytes
    ("max_memory", -1),
    ("max_memory", "lots"),
    ("max_memory", True),
    ("max_memory", float("inf")),
    ("tile", 0),
    ("tile", -16),
    ("tile", "big"),
    ("tile", 32.5),
    ("tile", True),
    ("format", "bmp"),
    ("format", 3),
]


@pytest.mark.parametrize("resolver", RESOLVERS.values(), ids=RESOLVERS.keys())
@pytest.mark.parametrize(("option", "value", "want"), ACCEPTED, ids=[f"{o}={v!r}" for o, v, _ in ACCEPTED])
def test_both_resolvers_accept_and_resolve_alike(resolver, option, value, want):
    got = resolver(**{option: value})[option]
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("resolver", RESOLVERS.values(), ids=RESOLVERS.keys())
@pytest.mark.parametrize(("option", "value"), REFUSED, ids=[f"{o}={v!r}" for o, v in REFUSED])
def test_both_resolvers_refuse_with_an_option_error_naming_the_keyword(resolver, option, value):
    with pytest.raises(OptionError) as info:
        resolver(**{option: value})
    assert info.value.option == option
    message = info.value.message
    assert message.startswith("expected ") and f"got {value!r}" in message and "; " in message  # what, what came, how to fix
    assert "--" not in str(info.value)  # keywords, not the command line's flags


@pytest.mark.parametrize(("option", "value"), REFUSED, ids=[f"{o}={v!r}" for o, v in REFUSED])
def test_the_same_bad_value_gets_the_same_words_from_both(option, value):
    said = []
    for resolver in RESOLVERS.values():
        with pytest.raises(OptionError) as info:
            resolver(**{option: value})
        said.append(str(info.value))
    if option == "format":  # the same rule, over each command's formats (optimize writes no dzi)
        said = [s.replace(", dzi", "") for s in said]
    if option == "style_size":  # the same rule; optimize also takes None (each scale's long side)
        said = [s.replace(", or None (each scale's long side, at most the style's own)", "") for s in said]
    assert said[0] == said[1]


def test_option_error_is_one_class_wherever_it_is_imported():
    assert ultrastyle.api.OptionError is ultrastyle.options.OptionError is ultrastyle.OptionError
    assert issubclass(OptionError, ValueError)


def test_formats_differ_only_by_what_each_writes():
    assert _stylize(format="dzi")["format"] == "dzi"
    with pytest.raises(OptionError, match="expected one of png, jpg, tiff, got 'dzi'") as info:
        _optimize(format="dzi")
    assert info.value.option == "format"


def test_optimize_keeps_none_for_style_size_and_stylize_refuses_it():
    assert _optimize(style_size=None)["style_size"] is None  # each scale's long side, at most the style's own
    with pytest.raises(OptionError) as info:
        _stylize(style_size=None)
    assert info.value.option == "style_size"


@pytest.mark.parametrize(
    ("settings", "option"),
    [({"method": "gatys"}, "method"), ({"alpha": 1.5}, "alpha"), ({"alpha": True}, "alpha"), ({"levels": "5,,4"}, "levels"),
     ({"levels": (6,)}, "levels"), ({"levels": ()}, "levels"), ({"levels": ["5"]}, "levels"), ({"halo": "wide"}, "halo"),
     ({"halo": -1}, "halo"), ({"depth": 8.0}, "depth"), ({"io_memory": "0"}, "io_memory"), ({"preserve_color": "all"}, "preserve_color")],
)  # fmt: skip
def test_make_options_checks_method_alpha_levels_against_the_model_constants(settings, option):
    with pytest.raises(OptionError) as info:
        make_options(DEFAULTS, **settings)
    assert info.value.option == option and "--" not in str(info.value)


def test_make_options_resolves_levels_and_defaults():
    assert make_options(DEFAULTS, levels="5, 3,1,").levels == (5, 3, 1)
    assert make_options(DEFAULTS, levels=np.array([4, 2])).levels == (4, 2)
    assert make_options(DEFAULTS, levels=3).levels == (3,)
    o = make_options(DEFAULTS)
    assert (o.method, o.alpha, o.levels) == ("wct", 0.6, (5, 4))
    o = make_options(DEFAULTS, method="adain", alpha=1, halo="EXACT")
    assert (o.method, o.alpha, o.tiling.halo) == ("adain", 1.0, None) and type(o.alpha) is float


@pytest.mark.parametrize(("option", "value"), [("iterations", 2.5), ("iterations", -1), ("save_every", -1), ("history", 0)])
def test_make_optimize_options_counts_are_whole_numbers(option, value):
    with pytest.raises(OptionError) as info:
        make_optimize_options(**{option: value})
    assert info.value.option == option


@pytest.mark.parametrize(("style_size", "side"), [(0, 96), (None, 48), (32, 32)])
def test_optimize_style_size_0_keeps_the_style_s_own_size(cd16x_dir, monkeypatch, style_size, side):
    # As `ultrastyle stylize --style-size 0`: the style at its own size, not resized to the scale (None's rule).
    import ultrastyle.optimization.run as run

    seen = []
    real = run.style_target
    monkeypatch.setattr(run, "style_target", lambda *a, **k: seen.append(a[1].shape) or real(*a, **k))
    content = np.zeros((40, 48, 3), np.uint8) + 100
    style = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    with Optimizer(cd16x_dir) as opt:
        opt.run(content, style, iterations=0, scales="full", style_size=style_size, max_memory=None)
    assert seen and max(seen[0][-2:]) == side


def test_an_output_folder_that_is_a_file_or_named_like_one_is_refused_before_any_work(tmp_path):
    from ultrastyle.options import output_folder

    (tmp_path / "afile").write_text("x")
    for value, said in ((tmp_path / "afile", "is a file, and outputs go into a folder"), (tmp_path / "afile" / "sub", "afile is a file"),
                        (tmp_path / "r.jpg", "looks like a file name"), (tmp_path / "x.dzi", "looks like a file name")):  # fmt: skip
        with pytest.raises(OptionError, match=said) as info:
            output_folder("output_dir", value)
        assert info.value.option == "output_dir" and "--" not in info.value.message
    (tmp_path / "was.png").mkdir()  # an existing folder is a folder, whatever its name
    for ok in (tmp_path / "new" / "deeper", tmp_path, tmp_path / "was.png"):
        assert output_folder("output_dir", ok) == ok


def test_an_output_folder_that_cannot_be_written_or_is_empty_is_refused_before_any_work(tmp_path, monkeypatch):
    import os

    from ultrastyle import options

    ro = tmp_path / "ro"
    ro.mkdir()
    # As root, permission bits allow everything; what refuses a root writer is a read-only mount, which access() reports.
    monkeypatch.setattr(options.os, "access", lambda p, mode: Path(p) != ro if mode & os.W_OK else True)
    with pytest.raises(OptionError, match="ro is not writable") as info:
        options.output_folder("output_dir", ro)
    assert info.value.option == "output_dir"
    with pytest.raises(OptionError, match=r"ro/new cannot be made: .*ro is not writable"):
        options.output_folder("output_dir", ro / "new")
    assert options.output_folder("output_dir", tmp_path / "ok") == tmp_path / "ok"
    with pytest.raises(OptionError, match="an empty path .*give a folder"):
        options.output_folder("output_dir", "")


@pytest.mark.parametrize("call", ["stylize_batch contents", "stylize_batch styles", "optimize contents", "optimize output",
                                  "load model", "Optimizer model", "export_model model"])
def test_an_empty_path_is_an_option_error_naming_the_keyword(call, monkeypatch):
    import ultrastyle
    from ultrastyle import api
    from ultrastyle.optimization.batch import plan_outputs

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was opened"))
    fn, keyword = call.split()
    with pytest.raises(OptionError, match="an empty path") as info:
        if fn == "stylize_batch":
            ultrastyle.stylize_batch(*(["", "s.jpg"] if keyword == "contents" else ["c.jpg", ["s.jpg", ""]]))
        elif keyword == "model":  # "" is the current folder: "no model weights in ." said nothing of the cause
            {"load": api.Stylizer, "Optimizer": ultrastyle.Optimizer, "export_model": ultrastyle.export_model}[fn]("", *(["b"] if fn == "export_model" else []))
        else:
            plan_outputs(*(["", "s.jpg", "out"] if keyword == "contents" else ["c.jpg", "s.jpg", ""]), "png")
    assert info.value.option == keyword


def test_stylize_batch_refuses_a_file_as_its_folder_before_the_model_opens(tmp_path, monkeypatch):
    import ultrastyle
    from ultrastyle import api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was opened"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OptionError, match="is a file"):
        ultrastyle.stylize_batch(["c.jpg"], ["s.jpg"], tmp_path / "afile")


@pytest.mark.parametrize("resolve", ["stylize", "optimize"])
def test_a_scratch_folder_that_is_missing_or_a_file_is_refused_by_both_resolvers(tmp_path, resolve):
    (tmp_path / "afile").write_text("x")
    for value, said in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "afile", "is a file")):
        with pytest.raises(OptionError, match=said) as info:
            if resolve == "stylize":
                make_options(DEFAULTS, scratch=value)
            else:
                make_optimize_options(scratch=value)
        assert info.value.option == "scratch"
    assert make_options(DEFAULTS, scratch=tmp_path).tiling.scratch_dir == tmp_path
    if Path("/proc/self").is_dir():  # a folder that takes no files, even for root: the command line refused it, Python took it
        with pytest.raises(OptionError, match="/proc/self is not writable"):
            make_options(DEFAULTS, scratch="/proc/self") if resolve == "stylize" else make_optimize_options(scratch="/proc/self")


def test_ray_settings_without_the_ray_executor_are_refused_not_ignored(monkeypatch):
    import ultrastyle
    from ultrastyle import api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("the model was opened"))
    for kw, option in (({"ray_address": "10.0.0.1:10001"}, "ray_address"), ({"distribute_tiles": True}, "distribute_tiles")):
        with pytest.raises(OptionError, match="executor='ray'") as info:
            ultrastyle.stylize_batch(["c.jpg"], ["s.jpg"], "out", **kw)
        assert info.value.option == option


def test_a_halo_without_tiles_is_refused_rather_than_dropped():
    # max_memory=None runs each stage whole unless a tile side is given; a halo there had no effect and no word.
    with pytest.raises(OptionError, match="halo: 8 px bounds the overlap of tiles"):
        make_options(DEFAULTS, max_memory=None, halo=8)
    fixed = make_options(DEFAULTS, max_memory=None, tile=64, halo=8).tiling  # tiles of a fixed side, approximate: as asked
    assert (fixed.max_memory, fixed.tile, fixed.halo) == (None, 64, 8)
    assert make_options(DEFAULTS, max_memory=None, halo="exact").tiling.halo is None


def test_named_choices_take_any_case_from_python_as_the_command_line_does():
    from ultrastyle.calibration.quantize import CalibrationSettings
    from ultrastyle.runtime.backends.select import check_runner_options

    o = make_options(DEFAULTS, method="AdaIN", preserve_color="LUMINANCE", streaming="Never", tiff_layout="Plain", dzi_tiles="JPG")
    assert (o.method, o.preserve_color, o.streaming, o.pyramid.tiff_layout, o.pyramid.dzi_tile_format) == (
        "adain", "luminance", "never", "plain", "jpg")  # fmt: skip
    assert check_runner_options(backend="ONNXRuntime", device="CUDA:1", precision="FP16") == ("onnxruntime", "cuda:1", "fp16")
    from ultrastyle.distill.config import DecoderConfig

    config = DecoderConfig(stage=1, out="o", images="i", encoder="cd-wct-16x", device="CPU")
    config.check(True)
    assert config.device == "cpu"  # it passed the check as "CPU" and failed later in torch
    s = CalibrationSettings(method="MinMax", keep_float="Ends", activations="UINT8")
    assert (s.method, s.keep_float, s.activations) == ("minmax", "ends", "uint8")
    assert make_optimize_options(solver="LBFGS", init="Noise").solver == "lbfgs"
    with pytest.raises(OptionError, match="expected one of minmax, entropy, percentile, got 'min max'"):
        CalibrationSettings(method="min max")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder that takes no new folders even for root")
def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work_even_where_access_says_yes(tmp_path, monkeypatch):
    monkeypatch.setattr(ultrastyle.options.os, "access", lambda *a, **k: True)  # as it answers root, whoever runs this
    with pytest.raises(OptionError, match=r"/proc/nope cannot be made: /proc is not writable \((No such file|Permission)"):
        ultrastyle.options.output_folder("output_dir", "/proc/nope")  # os.access says yes to root: the compute ran first
    assert ultrastyle.options.output_folder("output_dir", tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing


def test_a_broken_link_as_output_folder_and_a_file_above_an_output_file_are_refused_before_any_work(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(OptionError, match=rf"{link} is a link to {tmp_path / 'gone'}, which does not exist; give a folder you can write"):
        ultrastyle.options.output_folder("output_dir", link)  # exists() said no: the model opened and every write failed
    with pytest.raises(OptionError, match=rf"{link / 'sub'} cannot be made: {link} is a link to {tmp_path / 'gone'}, which does not"):
        ultrastyle.options.output_folder("output_dir", link / "sub")
    with pytest.raises(OptionError, match=rf"{link / 'x.png'} cannot be made|{link} is a link to {tmp_path / 'gone'}, which does not"):
        ultrastyle.options.output_file(link / "x.png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OptionError, match=rf"{tmp_path / 'afile'} is a file; give a file in a folder you can write"):
        ultrastyle.options.output_file(tmp_path / "afile" / "x.png")
    with pytest.raises(OptionError, match=rf"{tmp_path / 'afile' / 'd'} cannot be made: {tmp_path / 'afile'} is a file"):
        ultrastyle.options.output_file(tmp_path / "afile" / "d" / "x.png")
    assert ultrastyle.options.output_file(tmp_path / "new" / "x.png") == tmp_path / "new" / "x.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "out"]


def test_a_cuda_device_past_the_ones_pytorch_sees_says_which_there_are():
    from ultrastyle.options import cuda_shortfall

    assert cuda_shortfall("cpu", 0) is None and cuda_shortfall("cuda:1", 2) is None and cuda_shortfall("cuda", 1) is None
    assert cuda_shortfall("cuda", 0) == cuda_shortfall("cuda:3", 0) == "no CUDA device is available to PyTorch here"
    assert cuda_shortfall("cuda:2", 2) == "PyTorch sees 2 CUDA device(s) here, cuda:0 to cuda:1"


def test_the_fix_a_message_gives_is_a_value_that_works():
    from ultrastyle.distill.config import ConfigError, DistillConfig

    with pytest.raises(OptionError, match=r"depth: expected 8 or 16 \(bits per sample\), got -1; give 8, or 16"):
        make_options(DEFAULTS, depth=-1)  # it said "give 0 or more", and 0 is refused
    assert make_options(DEFAULTS, depth=16).depth == 16
    cores = __import__("os").cpu_count() or 1
    with pytest.raises(OptionError, match=rf"give at most {ultrastyle.options.MAX_THREADS_PER_CORE * cores}, or 0 for the default"):
        ultrastyle.options.thread_count("threads", 10**6)
    with pytest.raises(ConfigError, match=r"crop: expected a whole number of pixels, a multiple of 16 at stage 5, >= 32, got -8; give 32"):
        DistillConfig(stage=5, out="o", images="i", teacher="cd-wct-16x", crop=-8).check(True)


def test_the_cpus_a_job_may_use_are_its_affinitys_not_the_nodes(monkeypatch):
    """A 4-core job on a 128-core node got 8 reader threads and a thread limit sized by 128 cores."""
    import os

    from ultrastyle import options
    from ultrastyle.runtime.batch import default_io_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert options.usable_cpus() <= 4 and default_io_workers() <= 2
    with pytest.raises(options.OptionError, match=r"cores here\)"):
        options.thread_count("threads", options.MAX_THREADS_PER_CORE * 4 + 1)


@pytest.mark.parametrize("version", [1, 2])
def test_a_cpu_quota_on_a_parent_cgroup_bounds_the_cpus(tmp_path, monkeypatch, version):
    from ultrastyle import options

    root = tmp_path / "cg"
    if version == 2:
        (tmp_path / "self").write_text("0::/kubepods/pod1/ctr\n")
        pod = root / "kubepods" / "pod1"
        (pod / "ctr").mkdir(parents=True)
        (pod / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs on the pod: 3
        (pod / "ctr" / "cpu.max").write_text("max 100000\n")
    else:
        (tmp_path / "self").write_text("4:memory:/\n2:cpu,cpuacct:/job/step\n")
        job = root / "cpu,cpuacct" / "job"
        (job / "step").mkdir(parents=True)
        (job / "cpu.cfs_quota_us").write_text("300000\n")
        (job / "cpu.cfs_period_us").write_text("100000\n")
        (job / "step" / "cpu.cfs_quota_us").write_text("-1\n")
        (job / "step" / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(options, "CGROUP_FILE", str(tmp_path / "self"))
    monkeypatch.setattr(options, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert options.usable_cpus() == 3
