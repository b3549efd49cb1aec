"""Bookkeeping of training: loss CSV and plot, learning-rate schedule, config layering, PSNR/SSIM."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ultrastyle.distill.config import ConfigError, DistillConfig, for_resume, resolve
from ultrastyle.distill.logs import LossLog, plot_losses
from ultrastyle.distill.metrics import psnr, ssim
from ultrastyle.distill.trainer import TrainOptions, learning_rate


pytestmark = pytest.mark.usefixtures("one_thread")


def test_csv_log_truncates_to_a_checkpoint_and_plots_without_matplotlib(tmp_path, monkeypatch):
    log = LossLog(tmp_path / "log.csv")
    for step in range(1, 7):
        log.append(step, "train", step * 0.1, 1e-3, {"loss": 10.0 / step, "pixel": 1.0 / step})
    log.append(4, "val", 0.4, 1e-3, {"loss": 3.0, "pixel": 0.3})
    log.truncate(4)
    rows = LossLog(tmp_path / "log.csv").rows()
    assert [(r["step"], r["split"]) for r in rows] == [("1", "train"), ("2", "train"), ("3", "train"), ("4", "train"), ("4", "val")]
    assert list(rows[0]) == ["step", "split", "seconds", "lr", "loss", "pixel"]
    log.append(5, "train", 0.5, 1e-3, {"loss": 2.0, "pixel": 0.2})  # the resumed run goes on
    raw = (tmp_path / "log.csv").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == 7  # one line ending in the whole file, as csv writes it
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # force the PIL fallback
    png = plot_losses(tmp_path / "log.csv", tmp_path / "losses.png", title="run")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (520, 220)
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 3  # something was drawn


def _lr(schedule: str, step: int, warmup: int = 0) -> float:
    return learning_rate(TrainOptions(steps=100, lr=1e-3, lr_schedule=schedule, warmup_steps=warmup), step)


def test_learning_rate_schedules_depend_on_the_step_only():
    assert _lr("constant", 0) == _lr("constant", 99) == 1e-3
    assert _lr("cosine", 0) == pytest.approx(1e-3)
    assert _lr("cosine", 50) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert _lr("cosine", 100) == pytest.approx(1e-5)
    assert _lr("constant", 0, warmup=10) == pytest.approx(1e-4) and _lr("constant", 9, warmup=10) == pytest.approx(1e-3)


def test_config_layers_defaults_file_flags_and_resume_rules(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("teacher: t\nimages: imgs\nlr: 0.01\nbatch-size: 8\n")
    cfg = resolve(DistillConfig, cfg_file, {"lr": 0.002, "stage": 2, "out": "o", "crop": None})
    assert (cfg.teacher, cfg.lr, cfg.batch_size, cfg.crop, cfg.beta) == ("t", 0.002, 8, 256, 10.0)
    cfg.check()
    longer = resolve(DistillConfig, cfg_file, {"lr": 0.002, "stage": 2, "out": "o", "steps": 5000})
    assert for_resume(cfg, longer, {"steps": 5000, "lr": 0.002}).steps == 5000
    with pytest.raises(ConfigError, match=r"batch_size=8 \(now 4\)"):
        for_resume(cfg, resolve(DistillConfig, cfg_file, {"stage": 2, "out": "o", "batch_size": 4}), {"batch_size": 4})
    assert for_resume(cfg, resolve(DistillConfig, cfg_file, {"stage": 2, "out": "o"}), {"lr": 0.01}).lr == 0.01  # lowered after a loss that diverged
    with pytest.raises(ConfigError, match="batch_size: expected int"):
        resolve(DistillConfig, None, {"batch_size": "many"})


def test_psnr_and_ssim_reference_values():
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x) == math.inf and ssim(x, x) == pytest.approx(1.0)
    y = (x + 0.1).clamp(0, 1)
    assert psnr(x, y) == pytest.approx(10 * math.log10(1 / float(((y - x) ** 2).mean())), rel=1e-6)
    noisy = (x + 0.3 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0 < ssim(x, noisy) < ssim(x, (x + noisy) / 2) < 1
    assert ssim(torch.zeros(3, 16, 16), torch.ones(3, 16, 16)) < 0.01


def test_a_runs_own_config_file_is_reusable_and_is_not_resumed_as_the_other_kind_of_run(tmp_path):
    # A user review: `-c RUN/config.yaml` said "unknown setting 'resolved'"; a distill run folder resumed as a decoder's
    # listed every known setting instead of saying which kind of run it was.
    from ultrastyle.distill.config import DecoderConfig, read_saved, write_yaml

    saved = tmp_path / "config.yaml"
    write_yaml(DistillConfig(teacher="t", stage=2, out="o", images="i", lr=0.003), saved, {"architecture": {"name": "x"}})
    again = resolve(DistillConfig, saved, {"out": "new"})
    assert (again.teacher, again.lr, again.out) == ("t", 0.003, "new")
    with pytest.raises(ConfigError, match="'teacher' is a setting of a student encoder's run, not of a decoder's run"):
        read_saved(DecoderConfig, saved)


def test_a_key_given_nothing_says_required_or_to_leave_it_out_for_its_default():
    from ultrastyle.distill.config import from_mapping

    for mapping, said in (({"teacher": None}, "teacher: required, got nothing"), ({"stage": None}, "stage: required, got nothing"),
                          ({"device": None}, "device: got nothing (null); leave it out for its default, cpu")):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(said)):
            from_mapping(DistillConfig, mapping)


def test_a_config_file_is_read_from_python_with_keywords_over_it(tmp_path, monkeypatch):
    import ultrastyle

    (tmp_path / "d.yaml").write_text("teacher: cd-wct-16x\nimages: photos/\nout: mine/\nstage: 2\nsteps: 50\nlr: 0.001\n")
    c = ultrastyle.DistillConfig.from_file(tmp_path / "d.yaml", stage=4, steps=None)  # None: not given, as a flag left out
    assert isinstance(c, DistillConfig) and (c.teacher, c.stage, c.steps, c.lr, c.batch_size) == ("cd-wct-16x", 4, 50, 0.001, 4)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ultrastyle.DistillConfig.from_file("~/d.yaml").stage == 2
    (tmp_path / "bad.yaml").write_text("stage: 2\nwidht_factor: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown setting 'widht_factor'"):
        ultrastyle.DistillConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="'teacher' is a setting of a student encoder's run, not of a decoder's run"):
        ultrastyle.DecoderConfig.from_file(tmp_path / "d.yaml")
