"""benchmarks/gpu_torch.py runs end to end: its ``--device cpu`` smoke run, so the GPU check a lent device
runs (benchmarks/gpu_check.sh) does not first meet a broken script there. No figure is judged: only that
every row ran, and that the outputs it compares agree (tiled = whole, bf16 near fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_smoke_run_fills_every_row(cd16x_dir, shared_dir, tmp_path):
    report = tmp_path / "gpu_torch.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_torch.py"), "--device", "cpu", "--model", str(cd16x_dir),
           "--configs", "fp32,bf16,fp32+compile+hostfit,fp32+syncio,fp32+hostcache", "--paths", "whole,tiled", "--compare",
           "--networks", "--floors", "--psnr-pairs", "1", "--json", str(report),
           "--pairs-content", str(shared_dir / "images" / "content"), "--pairs-style", str(shared_dir / "images" / "style")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(report.read_text())
    assert r["device"] == "CPU (smoke run)" and r["floors"]["gflop_per_mp"] > 100
    # networks: fp32 and bf16 (hostfit only changes the cascade), 5 stages and stage 5 alone, at the smoke size
    assert [(n["config"], n["what"]) for n in r["networks"]] == [
        (c, w) for c in ("fp32", "bf16") for w in ("networks 5+4+3+2+1", "networks 5")
    ]
    assert all("error" not in n and n["size"] == "128x128" and n["ms_per_mp"] > 0 for n in r["networks"])
    (psnr,) = r["psnr"]  # one row per config other than fp32
    assert psnr["config"] == "bf16" and psnr["pairs"] == 1 and 25 < psnr["psnr_mean_db"] < 60
    rows = {(x["config"], x["path"]): x for x in r["rows"]}
    assert set(rows) == {("fp32", "whole"), ("fp32", "tiled 96MB"), ("bf16", "whole"), ("bf16", "tiled 96MB"),
                         ("fp32+compile+hostfit", "whole"), ("fp32+syncio", "tiled 96MB"), ("fp32+hostcache", "tiled 96MB")}  # fmt: skip
    assert all("error" not in x and x["ms_per_mp"] > 0 for x in rows.values()), r["rows"]
    # --compare: against fp32's whole image. Tiling is exact; bf16 networks and a compiled graph are near it.
    assert rows["fp32", "whole"]["max_diff_uint8"] == 0
    assert rows["fp32", "tiled 96MB"]["max_diff_uint8"] <= 1
    assert rows["fp32+syncio", "tiled 96MB"]["max_diff_uint8"] <= 1  # reads and writes in line: the same tiles
    assert rows["fp32+hostcache", "tiled 96MB"]["max_diff_uint8"] <= 1  # caches or not, tiling is exact
    assert rows["fp32", "tiled 96MB"]["plan"].startswith("ram; cache 2345; tiles ")  # a CPU caches where encoders cost 200 MACs/float
    assert rows["fp32+compile+hostfit", "whole"]["max_diff_uint8"] <= 2
    assert rows["bf16", "whole"]["max_diff_uint8"] < 128
    assert rows["fp32", "tiled 96MB"]["tiled_over_whole"] > 0
    assert rows["fp32+compile+hostfit", "whole"]["compiles"] >= 1  # Dynamo compiled this row's graphs


@pytest.mark.slow
def test_the_gpu_check_script_dry_runs_on_the_cpu(shared_dir, tmp_path):
    # benchmarks/gpu_check.sh itself, with GPU_CHECK_DEVICE=cpu: its command lines, the JSON it reads
    # back for the summary, and the pytest -m gpu step (every test skips here, saying why).
    out = tmp_path / "out"
    # The device's budget (240 s): unloaded, every row starts within ~100 s here; a loaded machine may skip the last ones.
    # GPU_CHECK_TOTAL_S: the CUDA-graphs phase runs however long the rest took on this machine.
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "BENCH_BUDGET_S": "240", "GPU_CHECK_TOTAL_S": "1200", "OUT": str(out), "PYTHON": sys.executable,
           "ULTRASTYLE_SHARED": str(shared_dir), "ULTRASTYLE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "2"}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=1500, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "== pytest exit 0" in done.stdout and "networks fp16+compile ms/MP:" in done.stdout
    r = json.loads((out / "gpu_torch.json").read_text())
    assert r["device"] == "CPU (smoke run)"
    nets = {(n["config"], n["what"]) for n in r["networks"] if "error" not in n}
    assert {("fp32", "networks 5+4+3+2+1"), ("bf16", "networks 5+4+3+2+1")} <= nets  # fp16 runs as bf16 on a CPU
    assert not [x for x in r["rows"] if "error" in x]
    ran = {(x["config"], x["path"].split()[0]) for x in r["rows"]}
    skipped = " | ".join(r.get("skipped", []))
    for cfg in ("fp32", "bf16", "bf16+compile", "bf16+compile+hostfit", "bf16+hostcache"):  # each row ran or was skipped for time
        for path in ("whole", "tiled"):
            if ("hostfit" in cfg and path == "tiled") or ("hostcache" in cfg and path == "whole"):
                continue
            assert (cfg, path) in ran or f"{cfg} {path}" in skipped, (cfg, path, ran, skipped)
    assert ("fp32", "whole") in ran and ("fp32", "tiled") in ran  # the first rows always run
    rows = {(x["config"], x["path"].split()[0]): x for x in r["rows"]}
    assert rows["fp32", "tiled"]["max_diff_uint8"] <= 1  # --compare: tiling is exact
    # The CUDA-graphs comparison ran last (time remained here): compile mode reduce-overhead beside plain compile.
    assert "== CUDA graphs exit 0" in done.stdout and "CUDA graphs vs compile, ms/MP:" in done.stdout
    g = json.loads((out / "gpu_graphs.json").read_text())
    graphs = {(x["config"], x["path"].split()[0]): x for x in g["rows"]}
    assert set(graphs) == {(c, p) for c in ("bf16+compile", "bf16+compile+graphs") for p in ("whole", "tiled")}
    assert all("error" not in x and x["max_diff_uint8"] <= 2 for x in graphs.values()), g["rows"]
