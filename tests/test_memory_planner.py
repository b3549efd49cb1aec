"""The memory planner: byte sizes, tile sizes from a budget, and its estimate against a measured peak."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ultrastyle.core.tile_memory import core_for_budget, parse_bytes, region_side_for_budget, stage_bytes_per_pixel
from ultrastyle.core.arch import ARCHS


@pytest.mark.parametrize("text,value", [("2GB", 2 * 2**30), ("512MB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("1024", 1024), ("64k", 65536)])
def test_parse_bytes_reads_binary_units(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "GB", "2 XB", "-1GB", "two"])
def test_parse_bytes_rejects_garbage_with_examples(text):
    with pytest.raises(ValueError, match="examples"):
        parse_bytes(text)


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_budget_gives_the_largest_grid_region_that_fits(stage):
    spec, budget = ARCHS["cd16x"], 256 * 2**20
    side = region_side_for_budget(spec, stage, budget)
    g = spec.grid(stage)
    per_px = stage_bytes_per_pixel(spec, stage)
    assert side % g == 0
    assert side**2 * per_px <= budget < (side + g) ** 2 * per_px
    core = core_for_budget(spec, stage, budget, halo=32)
    assert core == side - 64


def test_too_small_budget_names_the_minimum():
    with pytest.raises(ValueError, match=r"too small for stage 5 .* needs at least \d+ MiB"):
        core_for_budget(ARCHS["cd16x"], 5, 2**20, halo=160)


_PROBE = r"""
import json, sys, torch
from ultrastyle.core.tile_memory import stage_bytes_per_pixel
from ultrastyle.core.transforms import apply_affine
from ultrastyle.models.pretrained import load_cd_folder

k, side, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
m = load_cd_folder(folder, stages=(k,))
enc, dec = m.encoders[k], m.decoders[k]
eye = torch.eye(enc.out_channels, dtype=torch.float64)
zero = torch.zeros(enc.out_channels, dtype=torch.float64)
with torch.inference_mode():  # warm up oneDNN on a small tile first
    dec(apply_affine(enc(torch.rand(1, 3, 64, 64)), eye, zero))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

x = torch.rand(1, 3, side, side)
base = status("VmRSS")
with torch.inference_mode():
    y = dec(apply_affine(enc(x), eye, zero))
measured = status("VmHWM") - base
# the input tile is part of the estimate but already counted in the baseline
estimate = (stage_bytes_per_pixel(m.arch, k) - 12) * side * side
print(json.dumps({"measured": measured, "estimate": estimate}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/self/status (Linux)")
@pytest.mark.parametrize("stage,side", [(1, 1024), (2, 1024), (3, 1024), (4, 1024), (5, 1024), (1, 1536), (5, 1536)])
def test_memory_estimate_within_25_percent_of_measured_peak(cd16x_dir, stage, side):
    # A fresh process per measurement: its high-water mark is this stage network's alone.
    out = subprocess.run([sys.executable, "-c", _PROBE, str(stage), str(side), str(cd16x_dir)],
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = r["estimate"] / r["measured"]
    assert 0.75 <= ratio <= 1.25, f"estimate {r['estimate'] / 2**20:.0f} MiB vs measured {r['measured'] / 2**20:.0f} MiB"


_STAGE5_FAULTS = """
import resource, sys
from ultrastyle.runtime.memory import _libc, keep_freed_memory, use_huge_pages
models, malloc, pages, trim = sys.argv[1:5]
applied = keep_freed_memory() if malloc == "keep" else False
huge = use_huge_pages() if pages == "huge" else False  # before the first tensor
import torch
from ultrastyle.models.pretrained import load_cd_folder
torch.set_num_threads(1)
model = load_cd_folder(models, stages=(5,))
x = torch.rand(1, 3, 768, 768)
with torch.inference_mode():
    model.encode(5, x)  # the first tile maps its memory in
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        if trim == "trim":
            _libc().malloc_trim(0)  # as the tiled path does once the heap grew past its share of the budget
        model.encode(5, x)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
try:
    with open("/proc/self/smaps_rollup") as f:
        anon_huge_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("AnonHugePages:"))
except (OSError, StopIteration):
    anon_huge_kb = -1
print(applied, huge, faults, anon_huge_kb)
"""


def _stage5_faults(models, malloc: str, pages: str = "small", trim: str = "no-trim") -> tuple[bool, bool, int, int]:
    """(keep_freed_memory applied, huge pages in effect, minor faults of 3 stage-5 tiles after the first, AnonHugePages kB)."""
    cmd = [sys.executable, "-c", _STAGE5_FAULTS, str(models), malloc, pages, trim]
    # conftest opts this process out; the probe decides for itself
    env = {k: v for k, v in os.environ.items() if k not in ("ULTRASTYLE_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    applied, huge, faults, anon = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.split()
    return applied == "True", huge == "True", int(faults), int(anon)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_freed_memory_lets_later_tiles_reuse_freed_pages(cd16x_dir):
    """Three more stage-5 tiles after the first: measured 10-15k minor faults kept vs 166-186k by default."""
    from ultrastyle.runtime.memory import _libc

    if _libc() is None:
        pytest.skip("not glibc (musl or another libc): there is nothing to tune")
    applied, _, kept, _ = _stage5_faults(cd16x_dir, "keep")
    _, _, default, _ = _stage5_faults(cd16x_dir, "system")
    assert applied
    assert kept * 4 < default, f"{kept} minor faults with freed memory kept, {default} with glibc's default"


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def fake_libc(monkeypatch):
    import ultrastyle.runtime.memory as mem

    libc = _FakeLibc()
    monkeypatch.setattr(mem, "_libc", lambda: libc)
    monkeypatch.setattr(mem, "_HEAP_KEEPS_FREED", False)
    monkeypatch.setattr(mem, "_rss_after_trim", None)
    monkeypatch.setattr(mem, "_HUGE_PAGES", False)
    monkeypatch.setattr(mem, "_KEPT_FOR_GOOD", False)
    monkeypatch.setattr(mem, "_HOLDERS", 0)
    monkeypatch.delenv("ULTRASTYLE_MALLOC", raising=False)
    return libc


def test_the_last_holder_puts_glibc_defaults_back_unless_kept_for_good(fake_libc):
    """An open Stylizer holds the setting; a service's own buffers are not kept after the last one closes."""
    import ultrastyle.runtime.memory as mem

    assert mem.hold_freed_memory() and mem.hold_freed_memory()
    mem.release_freed_memory()
    assert fake_libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**40 - 1)] and mem.heap_factor() == mem.HEAP_KEEP_FACTOR
    mem.release_freed_memory()
    assert fake_libc.calls[2:] == [("mallopt", -4, 65536), ("mallopt", -1, 128 * 1024), ("trim", 0)] and mem.heap_factor() == 1.0
    mem.release_freed_memory()  # one release too many: nothing
    assert len(fake_libc.calls) == 5
    assert mem.keep_freed_memory() and mem.hold_freed_memory()  # the command line keeps it for the process's life
    mem.release_freed_memory()
    assert len(fake_libc.calls) == 7 and mem.heap_factor() == mem.HEAP_KEEP_FACTOR


def test_a_stylizer_holds_the_heap_setting_while_open(fake_libc, cd16x_dir):
    import ultrastyle
    import ultrastyle.runtime.memory as mem

    with ultrastyle.load(cd16x_dir, backend="torch", levels=(5,)) as s:
        assert mem._HOLDERS == 1 and mem.heap_factor() == mem.HEAP_KEEP_FACTOR
        s.close()
        assert mem._HOLDERS == 0 and mem.heap_factor() == 1.0 and fake_libc.calls[-1] == ("trim", 0)
        s.stylize(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8))  # reopened: held again
        assert mem._HOLDERS == 1
    assert mem._HOLDERS == 0


def test_a_stylizer_dropped_unclosed_lets_go_of_the_heap_setting(fake_libc, cd16x_dir):
    """A service that drops a Stylizer without close() kept glibc's setting for the rest of the process (leak review)."""
    import gc

    import ultrastyle
    import ultrastyle.runtime.memory as mem

    s = ultrastyle.load(cd16x_dir, backend="torch", levels=(5,))
    assert mem._HOLDERS == 1
    del s
    gc.collect()
    assert mem._HOLDERS == 0 and mem.heap_factor() == 1.0
    with ultrastyle.load(cd16x_dir, backend="torch", levels=(5,)) as s:  # closed: let go once, not again when collected
        assert mem._HOLDERS == 1
    del s
    gc.collect()
    assert mem._HOLDERS == 0 and mem.hold_freed_memory() and mem._HOLDERS == 1


def test_keep_freed_memory_sets_mmap_max_and_trim_threshold_once_unless_opted_out(fake_libc, monkeypatch):
    import ultrastyle.runtime.memory as mem

    monkeypatch.setenv("ULTRASTYLE_MALLOC", "system")
    assert mem.keep_freed_memory() is False and fake_libc.calls == [] and mem.heap_factor() == 1.0
    monkeypatch.delenv("ULTRASTYLE_MALLOC")
    assert mem.keep_freed_memory() is True and mem.keep_freed_memory() is True
    assert fake_libc.calls == [("mallopt", -4, 0), ("mallopt", -1, 2**40 - 1)]
    assert mem.heap_factor() == mem.HEAP_KEEP_FACTOR


def test_trim_heap_waits_until_the_resident_set_grew_past_keep_bytes(fake_libc, monkeypatch):
    import ultrastyle.runtime.memory as mem

    rss = iter([100, 150, 100 + 2**20 + 1, 40, 40 + 2**20, 50])
    monkeypatch.setattr(mem, "resident_bytes", lambda: next(rss))
    mem.trim_heap(2**20)  # nothing measured yet: RSS 100 is the reference, nothing trimmed
    assert [c for c in fake_libc.calls if c[0] == "trim"] == []
    mem.trim_heap(2**20)  # 150: grew by 50 bytes, kept
    mem.trim_heap(2**20)  # grew by more than 1 MiB since the reference: trims, then RSS 40
    mem.trim_heap(2**20)  # grew by exactly 1 MiB since the trim: kept
    mem.trim_heap()  # no keep_bytes: always trims, then RSS 50
    assert [c for c in fake_libc.calls if c[0] == "trim"] == [("trim", 0), ("trim", 0)]
    assert mem._rss_after_trim == 50


def test_pytorch_runners_made_once_freed_memory_is_kept_plan_smaller_tiles_and_keep_them(fake_libc, cd16x_dir):
    from ultrastyle.core.plan import TilingOptions, plan_stages
    from ultrastyle.models.pretrained import load_cd_folder
    import ultrastyle.runtime.memory as mem
    from ultrastyle.runtime.backends.base import runner_traits
    from ultrastyle.runtime.backends.torch_backend import TorchRunner

    model = load_cd_folder(cd16x_dir, stages=(5,))
    opts = TilingOptions(max_memory=2**30)

    def plan(m):
        return plan_stages(m.arch, 4000, 4000, (5,), opts, runner_traits(m))[0]

    early = TorchRunner(model)
    before = [plan(m) for m in (model, early)]
    mem.keep_freed_memory()
    late = TorchRunner(model)
    after = [plan(m) for m in (model, early, late)]
    # The heap factor is read when a runner is made: plans never change with the process's heap state afterwards.
    assert before[0] == before[1] == after[0] == after[1]
    assert late.heap_factor == mem.HEAP_KEEP_FACTOR and TorchRunner(model, heap_factor=1.0).traits == early.traits
    # A runner made after `keep_freed_memory`: the region's area shrinks by the factor (to the grid).
    region = before[0].encode_core + 2 * before[0].enc_halo
    assert abs((after[2].encode_core + 2 * after[2].enc_halo) ** 2 * mem.HEAP_KEEP_FACTOR / region**2 - 1) < 0.05


def _thp_possible() -> bool:
    from ultrastyle.runtime.memory import transparent_huge_pages

    return transparent_huge_pages() not in (None, "never")


@pytest.mark.skipif(not _thp_possible(), reason="no transparent huge pages here (Linux with THP not 'never')")
def test_huge_pages_cut_the_faults_of_tiles_after_a_trim(cd16x_dir):
    """Three stage-5 tiles, each after a trim: measured ~10x fewer minor faults with huge pages."""
    from ultrastyle.runtime.memory import _libc

    if _libc() is None:
        pytest.skip("not glibc: no malloc_trim")
    _, in_effect, huge, anon_huge_kb = _stage5_faults(cd16x_dir, "keep", "huge", "trim")
    _, off, small, _ = _stage5_faults(cd16x_dir, "keep", "small", "trim")
    assert in_effect and not off
    if anon_huge_kb == 0:  # advised, but none granted (memory fragmented, a cgroup, defrag settings)
        pytest.skip("the kernel granted no huge pages to the test process (AnonHugePages 0)")
    assert huge * 4 < small, f"{huge} minor faults with huge pages, {small} without"


@pytest.mark.parametrize(
    ("env", "huge", "factor"),
    [({}, True, "HUGE_PAGE_HEAP_FACTOR"), ({"THP_MEM_ALLOC_ENABLE": "0"}, False, "HEAP_KEEP_FACTOR"),
     ({"ULTRASTYLE_MALLOC": "system"}, False, None)],
    ids=["default", "thp-env-0-respected", "system-malloc"],
)  # fmt: skip
def test_use_huge_pages_respects_explicit_opt_outs_and_sets_the_heap_factor(env, huge, factor):
    import ultrastyle.runtime.memory as mem

    if not _thp_possible() or mem._libc() is None:
        pytest.skip("no transparent huge pages or no glibc here (needs Linux, glibc, THP not 'never')")
    code = "from ultrastyle.runtime import memory as m; m.keep_freed_memory(); h = m.use_huge_pages(); print(h, m.heap_factor())"
    base = {k: v for k, v in os.environ.items() if k not in ("ULTRASTYLE_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**base, **env})
    expected_factor = float(getattr(mem, factor)) if factor else 1.0
    assert res.stdout.split() == [str(huge), str(expected_factor)]


def test_stylize_asks_for_huge_pages_for_tiled_pytorch_cpu_runs_only(monkeypatch, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    import ultrastyle.api as api
    import ultrastyle.cli.main as cli
    import ultrastyle.cli.stylize as stylize_cli

    calls = []

    def open_runner(*args, **kwargs):
        calls.append("runner")
        raise OSError("stopped here: the test only checks what ran before the model loads")

    monkeypatch.setattr(stylize_cli, "use_huge_pages", lambda: calls.append("huge"))
    monkeypatch.setattr(api, "open_runner", open_runner)
    for name in ("c.png", "s.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    cases = {("--backend", "torch"): ["huge", "runner"], ("--backend", "torch", "--no-tile"): ["runner"], (): ["runner"]}
    for extra, expected in cases.items():
        calls.clear()
        args = ["stylize", str(tmp_path / "c.png"), "-s", str(tmp_path / "s.png"), "-o", str(tmp_path / "out"), *extra]
        res = CliRunner().invoke(cli.app, args)
        assert "stopped here" in res.output
        assert calls == expected, (extra, calls, res.output)


def test_transparent_huge_pages_reads_the_bracketed_mode(monkeypatch, tmp_path):
    import builtins

    import ultrastyle.runtime.memory as mem

    real_open = builtins.open
    fake = tmp_path / "enabled"

    def fake_open(path, *args, **kwargs):
        return real_open(fake if str(path).endswith("transparent_hugepage/enabled") else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.delenv("ULTRASTYLE_MALLOC", raising=False)  # conftest opts the test process out
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for text, mode in (("always [madvise] never\n", "madvise"), ("[always] madvise never\n", "always"), ("always madvise [never]\n", "never")):
        fake.write_text(text)
        assert mem.transparent_huge_pages() == mode
        assert ("use them" in mem.describe_memory_setup()) == (mode != "never")
    fake.write_text("always [madvise] never\n")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert mem.describe_memory_setup().endswith("not used (THP_MEM_ALLOC_ENABLE=0)")
    fake.unlink()
    assert mem.transparent_huge_pages() is None


def test_every_command_keeps_freed_memory_first(monkeypatch):
    from typer.testing import CliRunner

    import ultrastyle.cli.main as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    result = CliRunner().invoke(cli.app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert calls == [True]


def test_a_fixed_tile_says_when_it_breaks_the_budget_or_is_dwarfed_by_its_halo():
    from ultrastyle.core.plan import TILE_OVERHEAD_WARN, TilingOptions, fixed_tile_notes, stage_cores, stage_halos
    from ultrastyle.core.traits import RunnerTraits

    arch, traits, levels = ARCHS["cd16x"], RunnerTraits(), (1, 2, 3, 4, 5)
    assert fixed_tile_notes(arch, levels, TilingOptions(max_memory=50 << 20), traits) == []  # automatic: the planner keeps the budget
    assert fixed_tile_notes(arch, levels, TilingOptions(tile=512, max_memory=2 << 30), traits) == []
    assert fixed_tile_notes(arch, levels, TilingOptions(tile=2048), traits) == []  # no budget to break, a halo small beside it

    (note,) = fixed_tile_notes(arch, levels, TilingOptions(tile=2048, max_memory=50 << 20), traits)
    region = (2048 + 2 * stage_halos(arch, 1).enc) ** 2 * stage_bytes_per_pixel(arch, 1)
    assert region > 50 << 20 and "tile 2048 px makes stage 1 regions" in note and "more than the 50 MiB" in note
    fits = min(min(stage_cores(arch, k, TilingOptions(max_memory=50 << 20))) for k in levels)
    assert f"a tile of {fits} px or an automatic one stays within it" in note
    assert fixed_tile_notes(arch, levels, TilingOptions(tile=fits, max_memory=50 << 20), traits) == []  # the tile it names does fit

    (slow,) = fixed_tile_notes(arch, levels, TilingOptions(tile=7, max_memory=2 << 30), traits)
    assert "stage 5's halo of 80 px" in slow and "about 121 times over" in slow  # ((16 + 160) / 16)^2: the core rounds up to the grid
    enough = int(slow.split("a tile of ")[1].split()[0])
    assert fixed_tile_notes(arch, levels, TilingOptions(tile=enough, max_memory=2 << 30), traits) == []
    assert ((32 + 160) / 32) ** 2 > TILE_OVERHEAD_WARN and fixed_tile_notes(arch, levels, TilingOptions(tile=32), traits)  # below it: noted


def test_size_text_names_small_budgets_in_their_own_unit():
    from ultrastyle.core.plan import size_text

    assert [size_text(n) for n in (1000, 3 << 10, 50 << 20, 1.5 * 2**30)] == ["1000 bytes", "3 KiB", "50 MiB", "1.5 GiB"]
    assert size_text((50 << 20) + 1, up=True) == "51 MiB" and size_text(1025, up=True) == "2 KiB"  # "at least" holds


def test_a_scratch_disk_too_small_for_the_caches_is_named_as_the_cause():
    """Without feature caches (no room on the scratch disk) pass 2 needs wider halos; where the budget then holds no tile,
    the error names the scratch folder, not the memory budget alone."""
    from dataclasses import replace

    from ultrastyle.core.plan import TilingOptions, plan_image, size_text
    from ultrastyle.core.traits import RunnerTraits

    arch, levels = ARCHS["cd16x"], (5, 4, 3, 2, 1)
    options = TilingOptions(max_memory=38 << 20, scratch_dir="/scratch", ram_canvas_limit=0)
    assert plan_image(arch, 2000, 3000, levels, options, RunnerTraits(), disk_free=20 << 30).site.disk_dir == "/scratch"
    with pytest.raises(ValueError, match=r"the scratch folder /scratch has 300 MiB free, too little for this image's feature caches"):
        plan_image(arch, 2000, 3000, levels, options, RunnerTraits(), disk_free=300 << 20)  # room for the canvases, not the caches
    # Room for neither: refused before any tile (it failed at the first canvas that did not fit, after the work before it)
    without = replace(options, cache_features=False).canvas_bytes(arch, 2000, 3000, levels)
    with pytest.raises(ValueError, match=rf"a 3000x2000 image's canvases need {size_text(without)} on disk and the scratch folder /scratch has 20 MiB free"):
        plan_image(arch, 2000, 3000, levels, options, RunnerTraits(), disk_free=20 << 20)
