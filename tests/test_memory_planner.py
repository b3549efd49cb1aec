"""The memory planner: byte sizes, tile sizes from a budget, and its estimate against a measured peak."""

import json
import subprocess
import sys

import pytest

from ultrastyle.models.spec import ARCHS
from ultrastyle.runtime.memory import core_for_budget, parse_bytes, region_side_for_budget, stage_bytes_per_pixel


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
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.memory import stage_bytes_per_pixel
from ultrastyle.runtime.transforms import apply_affine

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
