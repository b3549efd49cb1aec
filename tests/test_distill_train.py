"""Whole training runs: checkpoints, resume, Ctrl-C, logs, the CLI, and the trained model in use.

A tiny teacher (widths 6/8, written as a model folder) and 64 x 48 synthetic
photos keep every run to a fraction of a second of compute.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.cli.remedies import as_command
from ultrastyle.distill.config import ConfigError, DecoderConfig, DistillConfig
from ultrastyle.distill.jobs import TrainingInterrupted, distill, train_decoder
from ultrastyle.distill.outputs import OutputError, claim_folder, write_network
from ultrastyle.distill.trainer import read_checkpoint
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.pretrained import load_model
from ultrastyle.core.arch import ArchSpec


pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = ArchSpec("tinyteacher", (6, 8, 8, 8, 8))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = claim_folder(tmp_path_factory.mktemp("teacher"), TEACHER)
    torch.manual_seed(0)
    for k in (1, 2):
        write_network(d, f"{k}SE.pth", Encoder(TEACHER, k))
        write_network(d, f"{k}SD.pth", Decoder(TEACHER, k))
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((64, 48), Image.BILINEAR).save(d / f"p{i}.png")
    return d


def _config(teacher_dir: Path, photos: Path, out: Path, **kw) -> DistillConfig:
    base = dict(stage=2, out=str(out), images=str(photos), teacher=str(teacher_dir), crop=16, resize=24, batch_size=2,
                steps=6, checkpoint_every=2, log_every=1, workers=0, lr=1e-3, val_fraction=0.25)  # fmt: skip
    return DistillConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert set(obj) == {"model", "step"}
    return obj["model"]


def test_interrupted_crashed_and_resumed_run_equals_an_uninterrupted_one(teacher_dir, photos, tmp_path):
    whole = distill(_config(teacher_dir, photos, tmp_path / "a"))
    assert whole.train.status == "done" and whole.outputs == [tmp_path / "a" / "2SE.pth"]

    cfg = _config(teacher_dir, photos, tmp_path / "b")

    def ctrl_c_at_3(r):
        if r.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what a Ctrl-C in the terminal sends

    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 3 of 6; checkpoint written to .*: the same call with resume=True") as info:
        distill(cfg, on_step=ctrl_c_at_3)  # it returned: a caller's loop over stages went on to the next
    part = info.value.result
    assert part.train.status == "interrupted" and part.train.step == 3 and part.outputs == [] and part.train.signal == signal.SIGINT
    assert not (tmp_path / "b" / "2SE.pth").exists()
    ck = read_checkpoint(part.run_dir / "checkpoint.pt")
    assert ck["step"] == 3 and ck["optimizer"]["state"] and "torch" in ck["rng"]

    class Crash(Exception):
        pass

    def crash_at_5(r):
        if r.step == 5:
            raise Crash  # a killed process: step 5 is lost, the checkpoint of step 4 is not

    with pytest.raises(Crash):
        distill(cfg, resume=True, on_step=crash_at_5)
    assert read_checkpoint(part.run_dir / "checkpoint.pt")["step"] == 4

    done = distill(cfg, resume=True)
    assert done.train.status == "done" and done.train.step == 6
    a, b = _weights(tmp_path / "a" / "2SE.pth"), _weights(tmp_path / "b" / "2SE.pth")
    assert a.keys() == b.keys() and "conv21_aux.weight" in a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

    rows = list(csv.DictReader(open(done.run_dir / "log.csv")))
    train_steps = [int(r["step"]) for r in rows if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6]  # lost step 5 logged once, after the resume
    ref = list(csv.DictReader(open(whole.run_dir / "log.csv")))
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in ref]  # same losses, step by step, train and val


def test_a_finished_run_is_not_retrained_and_a_fresh_run_refuses_an_existing_checkpoint(teacher_dir, photos, tmp_path):
    cfg = _config(teacher_dir, photos, tmp_path / "m", steps=2)
    distill(cfg)
    again = distill(cfg, resume=True)
    assert again.train.status == "done" and again.train.step == 2
    from ultrastyle.distill.trainer import TrainingError

    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        distill(cfg)


def test_cli_distill_then_train_decoder_gives_a_model_that_loads_stylizes_and_exports(teacher_dir, photos, tmp_path):
    runner = CliRunner()
    out = tmp_path / "student"
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": str(teacher_dir), "images": str(photos), "crop": 16, "resize": 24,
                                   "batch-size": 2, "checkpoint_every": 2, "log_every": 1, "workers": 0, "lr": 1e-3}))  # fmt: skip
    r = runner.invoke(app, ["distill", "--config", str(cfg), "--stage", "1,2", "-o", str(out), "--steps", "3",
                            "--lr-schedule", "cosine", "--warmup-steps", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    run = out / "runs" / "2SE"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 3 and saved["crop"] == 16 and saved["teacher"] == str(teacher_dir)
    assert (saved["lr_schedule"], saved["warmup_steps"], saved["batch_size"]) == ("cosine", 2, 2)
    assert saved["resolved"]["architecture"]["widths"] == [3, 4, 4, 4, 4]
    with Image.open(run / "losses.png") as png:
        assert png.format == "PNG" and png.size[0] > 100
    assert {"embed", "pixel", "perceptual", "loss"} <= set(next(csv.DictReader(open(run / "log.csv"))))

    r = runner.invoke(app, ["distill", "--config", str(cfg), "--stage", "2", "-o", str(out), "--steps", "3", "--batch-size", "3",
                            "--lr-schedule", "cosine", "--warmup-steps", "2", "--resume"])  # fmt: skip
    assert r.exit_code == 2 and "batch_size=2 (now 3)" in r.output
    r = runner.invoke(app, ["distill", "--config", str(cfg), "--stage", "2", "-o", str(out), "--steps", "5",
                            "--lr-schedule", "cosine", "--warmup-steps", "2", "--resume"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert read_checkpoint(run / "checkpoint.pt")["step"] == 5

    r = runner.invoke(app, ["train-decoder", "-e", str(out), "--loss-encoder", str(teacher_dir), "--init", str(teacher_dir),
                            "--stage", "1,2", "--images", str(photos), "-o", str(out), "--steps", "3", "--crop", "16",
                            "--resize", "24", "--batch-size", "2", "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    for k in (1, 2):
        assert set(_weights(out / f"{k}SD.pth")) == {f"{n}.{p}" for n in (["conv11"] if k == 1 else ["conv21", "conv12", "conv11"]) for p in ("weight", "bias")}
    assert json.loads((out / "architecture.json").read_text())["widths"] == [3, 4, 4, 4, 4]

    model = load_model(out, stages=(1, 2))
    assert model.arch.widths == (3, 4, 4, 4, 4) and model.encoders[2].out_channels == 4
    assert model.decoders[2](model.encode(2, torch.rand(1, 3, 16, 16))).shape == (1, 3, 16, 16)

    img = tmp_path / "c.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(img)
    r = runner.invoke(app, ["stylize", str(img), "--style", str(img), "--model", str(out), "--levels", "2,1",
                            "--backend", "torch", "--style-size", "0", "-o", str(tmp_path / "styled")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "styled").iterdir())) == 1

    r = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "bundle"), "--stages", "1,2"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["architecture"]["widths"] == [3, 4, 4, 4, 4]
    assert {"encoder2", "decoder2", "decoder_affine1"} <= set(manifest["networks"])

    # A training bundle of the student: its Q_k embeddings map back to the teacher's widths.
    r = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "aux"), "--stages", "1,2", "--aux"])
    assert r.exit_code == 0, r.output
    aux = json.loads((tmp_path / "aux" / "manifest.json").read_text())["networks"]["encoder_aux2"]
    teacher = load_model(teacher_dir, stages=(1, 2)).arch
    assert [o["shape"][1] for o in aux["outputs"][1:]] == [teacher.feature_channels(1), teacher.feature_channels(2)]


def test_cli_settings_errors_are_one_line_and_exit_2(teacher_dir, photos, tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\nlearning_rate: 0.1\n")
    r = runner.invoke(app, ["distill", "--config", str(bad), "--stage", "1", "-o", str(tmp_path / "o"), "--images", str(photos)])
    assert r.exit_code == 2 and "unknown setting 'learning_rate'" in r.output
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "3", "-o", str(tmp_path / "o"), "--images", str(photos), "--crop", "10"])
    assert r.exit_code == 2 and "crop: stage 3 needs a multiple of 4" in r.output
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "1", "-o", str(tmp_path / "o"), "--images", str(tmp_path / "none")])
    assert r.exit_code == 2 and "images:" in r.output and "no such folder" in r.output  # refused before any work
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "1", "--images", str(photos)])
    assert r.exit_code == 2 and "out: required: give --out" in r.output  # the flag named, not just the setting
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "-o", str(tmp_path / "o"), "--images", str(photos)])
    assert r.exit_code == 2 and "stage: required: give --stage" in r.output, r.output  # not "got 0", a value never given
    typo = tmp_path / "typo.yaml"
    typo.write_text("steps: 2.5\n")
    r = runner.invoke(app, ["distill", "--config", str(typo), "-t", str(teacher_dir), "--stage", "1", "-o", str(tmp_path / "o"), "--images", str(photos)])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{typo}: steps: expected int, got 2.5" in text and "--steps" not in text, text
    typo.write_text("steps: 3\n")
    r = runner.invoke(app, ["distill", "--config", str(typo), "-t", str(teacher_dir), "--stage", "1", "-o", str(tmp_path / "o"), "--images", str(photos),
                            "--lr", "-1"])  # fmt: skip
    assert r.exit_code == 2 and "--lr: expected a number > 0, got -1" in " ".join(r.output.split()), r.output  # the flag's own value
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "1", "-o", str(tmp_path / "o"), "--images", str(photos), "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device" in r.output
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("device:\n")  # YAML's null: its default is meant, and the message says to leave it out
    r = runner.invoke(app, ["distill", "--config", str(nothing), "-t", str(teacher_dir), "--stage", "1", "-o", str(tmp_path / "o"), "--images",
                            str(photos)])  # fmt: skip
    assert r.exit_code == 2 and f"{nothing}: device: got nothing (null); leave it out for its default, cpu" in " ".join(r.output.split())


def test_train_decoder_writes_a_complete_teacher_model(teacher_dir, photos, tmp_path):
    """A collaborator decoder for a teacher: the folder also receives the encoder, so it is a model."""
    cfg = DecoderConfig(stage=1, out=str(tmp_path / "t"), images=str(photos), encoder=str(teacher_dir), crop=16,
                        resize=24, batch_size=2, steps=2, workers=0)  # fmt: skip
    result = train_decoder(cfg)
    assert sorted(p.name for p in result.outputs) == ["1SD.pth", "1SE.pth"]
    torch.testing.assert_close(_weights(tmp_path / "t" / "1SE.pth")["conv11.weight"], _weights(teacher_dir / "1SE.pth")["conv11.weight"])
    assert load_model(tmp_path / "t", stages=(1,)).arch.widths == TEACHER.widths


def test_a_vgg19_file_teacher_runs_the_same_commands(photos, tmp_path):
    """torchvision VGG-19 weights (random here) -> collaborator decoder -> 16x-wide student, stage 2."""
    torch.manual_seed(0)
    vgg = {f"features.{i}.{p}": t for i, (o, c) in {0: (64, 3), 2: (64, 64), 5: (128, 64)}.items()
           for p, t in (("weight", 0.05 * torch.randn(o, c, 3, 3)), ("bias", torch.zeros(o)))}  # fmt: skip
    torch.save(vgg, tmp_path / "vgg19.pth")
    common = dict(stage=2, images=str(photos), crop=16, resize=24, batch_size=2, steps=2, workers=0)
    train_decoder(DecoderConfig(**common, encoder=str(tmp_path / "vgg19.pth"), out=str(tmp_path / "teacher")))
    assert _weights(tmp_path / "teacher" / "2SE.pth")["conv21.weight"].shape == (128, 64, 3, 3)
    result = distill(DistillConfig(**common, teacher=str(tmp_path / "teacher"), width_factor=0.25, out=str(tmp_path / "s16")))
    se = _weights(result.outputs[0])
    assert se["conv21.weight"].shape == (32, 16, 3, 3) and se["conv21_aux.weight"].shape == (128, 32, 1, 1)
    assert json.loads((tmp_path / "s16" / "architecture.json").read_text())["name"] == "vgg19-x0.25"


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_in_a_real_process_writes_a_checkpoint_and_exits_128_plus_it(teacher_dir, photos, tmp_path, signum, status):
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    argv = [sys.executable, "-m", "ultrastyle", "distill", "-t", str(teacher_dir), "--stage", "2", "--images", str(photos),
            "-o", str(out), "--crop", "16", "--resize", "24", "--batch-size", "2", "--workers", "1", "--log-every", "1",
            "--threads", "1", "--checkpoint-every", "100000", "--steps", "100000"]  # fmt: skip
    # Its own process group, signalled whole: a terminal's Ctrl-C and systemd's or Slurm's SIGTERM reach the loader's workers too.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = out / "runs" / "2SE" / "log.csv"
    deadline = time.monotonic() + 60
    while not (log.is_file() and len(log.read_text().splitlines()) > 2) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signum)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, output
    assert "Run the same command with --resume" in output
    step = read_checkpoint(out / "runs" / "2SE" / "checkpoint.pt")["step"]
    assert step >= 2  # the steps done before Ctrl-C were kept, not only the step-0 state
    r = subprocess.run([*argv[:-1], str(step + 1), "--resume"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _weights(out / "2SE.pth") and read_checkpoint(out / "runs" / "2SE" / "checkpoint.pt")["step"] == step + 1


def test_sigterm_stops_training_after_its_step_with_a_checkpoint(teacher_dir, photos, tmp_path):
    """What `kill`, systemd and job schedulers send before they kill: taken as a first Ctrl-C, and the handler put back."""
    before = signal.getsignal(signal.SIGTERM)

    def term_at_2(r):
        if r.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        distill(_config(teacher_dir, photos, tmp_path / "t"), on_step=term_at_2)
    part = info.value.result
    assert part.train.status == "interrupted" and part.train.step == 2 and part.train.signal == signal.SIGTERM
    assert read_checkpoint(part.run_dir / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_fitted_inits_are_where_the_runs_start(teacher_dir, photos, tmp_path):
    """The default starts, ``init fit`` (encoder) and ``prune fit`` (decoder): a run with a vanishing lr saves the fitted networks."""
    from ultrastyle.distill.fit import fit_decoder, fit_encoder
    from ultrastyle.distill.jobs import calibration_crops, _data
    from ultrastyle.distill.sources import load_decoder, load_encoder

    out = tmp_path / "s"
    cfg = _config(teacher_dir, photos, out, steps=1, lr=1e-12)  # no init given: fit
    distill(cfg)
    teacher = load_encoder(str(teacher_dir), 2)
    cal = calibration_crops(_data(cfg, lambda m: None)[0])
    want = fit_encoder(teacher, TEACHER.student("tinyteacher-x0.5", 0.5), cal)[0].state_dict()
    got = _weights(out / "2SE.pth")
    assert set(got) == set(want)
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0)

    dcfg = DecoderConfig(stage=2, out=str(out), images=str(photos), encoder=str(out), loss_encoder=str(teacher_dir), init=str(teacher_dir),
                         crop=16, resize=24, batch_size=2, steps=1, lr=1e-12, workers=0, val_fraction=0.25)  # fmt: skip (no prune given: fit)
    train_decoder(dcfg)
    student = load_encoder(str(out), 2)
    want = fit_decoder(load_decoder(str(teacher_dir), 2), student.spec, student(cal), teacher(cal)).state_dict()
    got = _weights(out / "2SD.pth")
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-6, rtol=0)

    r = CliRunner().invoke(app, ["train-decoder", "-e", str(out), "--init", str(teacher_dir), "--prune", "lasso", "--stage", "2",
                                 "--images", str(photos), "-o", str(out)])  # fmt: skip
    assert r.exit_code == 2 and "lasso" in r.output
    dec_only = claim_folder(tmp_path / "dec_only", TEACHER)
    write_network(dec_only, "2SD.pth", load_decoder(str(teacher_dir), 2))
    with pytest.raises(ConfigError, match=r"prune: fit needs the encoder of the decoder it thins, .*2SE.pth, and there is none"):
        train_decoder(DecoderConfig(**{**dcfg.__dict__, "init": str(dec_only), "out": str(tmp_path / "o2")}))
    with pytest.raises(ConfigError, match="prune: must be one of l1, fit, got 'lasso'"):
        DecoderConfig(stage=2, out=str(out), images=str(photos), encoder=str(out), prune="lasso").check()


def _truncated_copy(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    return dst


def test_a_refused_fresh_run_leaves_the_saved_settings_as_they_were(teacher_dir, photos, tmp_path):
    from ultrastyle.distill.trainer import RunFolderInUse

    cfg = _config(teacher_dir, photos, tmp_path / "m", steps=2)
    distill(cfg)
    saved = (tmp_path / "m" / "runs" / "2SE" / "config.yaml").read_text()
    with pytest.raises(RunFolderInUse, match=r"already holds a checkpoint; resume it \(resume=True\)") as info:
        distill(_config(teacher_dir, photos, tmp_path / "m", steps=2, lr=0.01, kd="mse", beta=3.0))
    assert "resume it (--resume)" in as_command(info.value)  # the command line names its flag
    assert (tmp_path / "m" / "runs" / "2SE" / "config.yaml").read_text() == saved  # a later resume keeps the run's own settings


def test_paths_from_python_and_paths_written_another_way_on_resume(teacher_dir, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(teacher_dir, photos, Path("rel"), steps=2)
    cfg = DistillConfig(**{**cfg.__dict__, "images": Path(photos), "out": Path("rel")})  # Path objects, as Python callers pass
    assert distill(cfg).train.status == "done"
    again = distill(_config(teacher_dir, photos, tmp_path / "rel", steps=3), resume=True)  # the same folder, written absolute
    assert again.train.step == 3


def test_a_corrupt_photo_in_the_validation_split_is_left_out_with_a_warning(teacher_dir, photos, tmp_path):
    from ultrastyle.distill.data import CenterCrops, CropSettings

    bad = _truncated_copy(photos / "p0.png", tmp_path / "bad.png")
    notes: list[str] = []
    val = CenterCrops([bad, photos / "p1.png"], CropSettings(crop=16, resize=24)).readable(notes.append)
    assert val is not None and val.files == [photos / "p1.png"] and len(val) == 1 and val[0]["content"].shape == (3, 16, 16)
    assert len(notes) == 1 and "bad.png" in notes[0] and "left out of validation" in notes[0]
    assert CenterCrops([bad], CropSettings(crop=16, resize=24)).readable(notes.append) is None


def test_a_decoder_trained_in_adain_mode_makes_an_adain_model(teacher_dir, photos, tmp_path):
    from ultrastyle.models.sources import model_defaults

    cfg = DecoderConfig(stage=2, out=str(tmp_path / "ad"), images=str(photos), style=str(photos), mode="adain", encoder=str(teacher_dir),
                        crop=16, resize=24, batch_size=2, steps=2, workers=0)  # fmt: skip
    train_decoder(cfg)
    d = model_defaults(tmp_path / "ad")
    assert (d.method, d.levels, d.alpha) == ("adain", (2,), 1.0)


def test_cli_training_settings_from_a_file_and_bad_outputs(teacher_dir, photos, tmp_path):
    runner = CliRunner()
    common = ["-t", str(teacher_dir), "--images", str(photos), "--crop", "16", "--resize", "24", "-b", "2", "--steps", "2", "--workers", "0"]
    (tmp_path / "shared.yaml").write_text(f"stage: 1,2\nrun_dir: {tmp_path / 'one'}\n")
    r = runner.invoke(app, ["distill", "-c", str(tmp_path / "shared.yaml"), "-o", str(tmp_path / "s"), *common])
    assert r.exit_code == 2 and "one stage per run folder" in r.output, r.output  # the file's run_dir counts too
    (tmp_path / "stages.yaml").write_text("stage: [1, 2]\n")
    r = runner.invoke(app, ["distill", "-c", str(tmp_path / "stages.yaml"), "-o", str(tmp_path / "s"), *common])
    assert r.exit_code == 0 and (tmp_path / "s" / "1SE.pth").is_file() and (tmp_path / "s" / "2SE.pth").is_file(), r.output
    r = runner.invoke(app, ["distill", "--stage", "1", "-o", str(tmp_path / "s"), *common, "--steps", "1", "--resume"])
    assert r.exit_code == 0 and "already at step 2, past the 1 asked; nothing was trained" in " ".join(r.output.split()), r.output
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, ["distill", "--stage", "1", "-o", str(tmp_path / "afile"), *common])
    assert r.exit_code == 2 and "afile: is a file" in " ".join(r.output.split()), r.output
    (tmp_path / "photo.yaml").write_bytes(b"\x89PNG\r\n\x1a\n")  # an image given as the config: a traceback before
    r = runner.invoke(app, ["distill", "-c", str(tmp_path / "photo.yaml"), "-o", str(tmp_path / "s2"), *common])
    assert r.exit_code == 2 and "photo.yaml: not a UTF-8 text file (byte 0 is 0x89)" in r.output, r.output


def test_cli_names_a_photo_that_fails_to_decode_during_training(teacher_dir, photos, tmp_path):
    import shutil

    shutil.copytree(photos, tmp_path / "p")
    _truncated_copy(photos / "p0.png", tmp_path / "p" / "zz_truncated.png")
    r = CliRunner().invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "1", "--images", str(tmp_path / "p"), "-o", str(tmp_path / "o"),
                                 "--crop", "16", "--resize", "24", "-b", "4", "--steps", "4", "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "zz_truncated.png" in r.output  # in training (another image used) or left out of validation


def test_trained_weights_in_the_output_folder_are_not_replaced_by_a_fresh_run(teacher_dir, photos, tmp_path):
    """Its run folder may have been cleaned away; the weights are still refused to a fresh run, and kept byte for byte."""
    import shutil

    from ultrastyle.distill.outputs import OutputError

    cfg = _config(teacher_dir, photos, tmp_path / "m", steps=2)
    distill(cfg)
    shutil.rmtree(tmp_path / "m" / "runs")
    before = (tmp_path / "m" / "2SE.pth").read_bytes()
    for resume in (False, True):  # nothing to resume either: a run would start over
        with pytest.raises(OutputError, match=r"2SE.pth holds trained weights already, and .* has no checkpoint to resume") as info:
            distill(cfg, resume=resume)
        assert "(--out)" in as_command(info.value)
    assert (tmp_path / "m" / "2SE.pth").read_bytes() == before and not (tmp_path / "m" / "runs").exists()


def test_a_decoder_is_not_trained_into_a_folder_holding_another_encoder(teacher_dir, photos, tmp_path):
    import shutil

    from ultrastyle.distill.outputs import OutputError

    mixed = tmp_path / "mixed"
    shutil.copytree(teacher_dir, mixed)
    (mixed / "1SD.pth").unlink()
    write_network(mixed, "1SE.pth", Encoder(TEACHER, 1))  # another encoder of the same architecture
    cfg = DecoderConfig(stage=1, out=str(mixed), images=str(photos), encoder=str(teacher_dir), crop=16, resize=24, batch_size=2, steps=2, workers=0)
    with pytest.raises(OutputError, match="1SE.pth is another encoder than"):
        train_decoder(cfg)
    assert not (mixed / "1SD.pth").exists()
    same = tmp_path / "same"
    shutil.copytree(teacher_dir, same)
    (same / "1SD.pth").unlink()  # the folder's encoder is the one the decoder is trained for: accepted
    assert sorted(p.name for p in train_decoder(DecoderConfig(**{**cfg.__dict__, "out": str(same)})).outputs) == ["1SD.pth"]


def test_a_run_resumes_from_another_directory_and_from_a_copied_folder(teacher_dir, photos, tmp_path, monkeypatch):
    """Relative paths are saved resolved; where the run's files are (out, run_dir) is taken as given on resume."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(photos, work / "imgs")
    monkeypatch.chdir(work)
    cfg = _config(teacher_dir, Path("imgs"), Path("r1"), steps=2)
    distill(cfg, on_step=lambda r: None)
    saved = yaml.safe_load((work / "r1" / "runs" / "2SE" / "config.yaml").read_text())
    assert saved["images"] == str(work / "imgs") and saved["out"] == str(work / "r1")
    monkeypatch.chdir(tmp_path)  # elsewhere, the same folders written another way
    again = distill(_config(teacher_dir, work / "imgs", work / "r1", steps=3), resume=True)
    assert again.train.step == 3
    shutil.copytree(work / "r1", tmp_path / "copy")
    moved = distill(_config(teacher_dir, work / "imgs", tmp_path / "copy", steps=4), resume=True)
    assert moved.train.step == 4 and moved.outputs == [tmp_path / "copy" / "2SE.pth"]  # written where it was resumed, not in r1
    with pytest.raises(ConfigError, match=r"crop=16 \(now 32\)"):  # how it trains is still compared
        distill(_config(teacher_dir, work / "imgs", tmp_path / "copy", steps=5, crop=32), resume=True)
    # train-decoder's documented layout: the encoder is the output folder itself, and moves with it
    dec = DecoderConfig(stage=2, out=str(work / "r1"), encoder=str(work / "r1"), images=str(work / "imgs"), crop=16, resize=24,
                        batch_size=2, steps=2, checkpoint_every=1, workers=0)  # fmt: skip
    train_decoder(dec)
    shutil.copytree(work / "r1", tmp_path / "copy2")
    again = train_decoder(DecoderConfig(**{**dec.__dict__, "out": str(tmp_path / "copy2"), "encoder": str(tmp_path / "copy2"), "steps": 3}),
                          resume=True)  # fmt: skip
    assert again.train.step == 3 and again.outputs == [tmp_path / "copy2" / "2SD.pth"]


@pytest.mark.parametrize(("argv", "said"), [
    (["-t", "no-such-model"], "--teacher: unknown model 'no-such-model'"),
    (["-t", "./nowhere"], "--teacher: ./nowhere: no such model folder or weight file"),
    (["--init", "nothere.pth"], "--init: nothere.pth"),
])  # fmt: skip
def test_cli_networks_that_cannot_be_loaded_name_their_flag_and_exit_2(argv, said, teacher_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "home"))
    args = ["distill", "-t", str(teacher_dir), "--stage", "2", "-o", str(tmp_path / "o"), "--images", str(photos), "--steps", "2", *argv]
    r = CliRunner().invoke(app, args)
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and said in text, text
    assert not (tmp_path / "o" / "2SE.pth").exists()


def test_a_damaged_checkpoint_says_how_to_go_on_and_not_to_unpickle_it(teacher_dir, photos, tmp_path):
    from ultrastyle.distill.trainer import CHECKPOINT, TrainingError

    cfg = _config(teacher_dir, photos, tmp_path / "m", steps=2)
    distill(cfg)
    ck = tmp_path / "m" / "runs" / "2SE" / CHECKPOINT
    ck.write_bytes(b"\x80\x04garbage" * 8)
    with pytest.raises(TrainingError, match=r"checkpoint.pt: damaged or not a checkpoint .*delete it to start the run again") as info:
        distill(_config(teacher_dir, photos, tmp_path / "m", steps=3), resume=True)
    assert "weights_only" not in str(info.value)  # torch's advice would run pickled code


def test_a_log_gets_a_line_at_each_checkpoint_and_at_the_end(teacher_dir, photos, tmp_path, monkeypatch):
    """stderr piped to a file: plain progress lines, not one bar drawn once at the end."""
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # what would make rich take the log for a terminal
        monkeypatch.delenv(name, raising=False)
    r = CliRunner().invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "2", "-o", str(tmp_path / "o"), "--images", str(photos),
                                 "--steps", "4", "--checkpoint-every", "2", "--crop", "16", "--resize", "24", "--batch-size", "2",
                                 "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("stage 2 SE: step")]
    assert [line.split()[4] for line in lines][-1] == "4/4" and any("2/4" in line and "(checkpoint)" in line for line in lines), r.output
    assert "━" not in r.output  # no bar


def test_what_a_review_found_is_refused_or_said_before_training(teacher_dir, photos, tmp_path):
    """Tracebacks for a collaborator or a start narrower than the networks, a run folder that cannot be one, a finished
    stage rewritten by --resume with a false warning, and a cosine schedule changed in silence."""
    narrow = ArchSpec("tinynarrow", (3, 4, 4, 4, 4))
    small = claim_folder(tmp_path / "narrow", narrow)
    for k in (1, 2):
        write_network(small, f"{k}SE.pth", Encoder(narrow, k))
        write_network(small, f"{k}SD.pth", Decoder(narrow, k))
    with pytest.raises(ConfigError, match=r"^collaborator: the stage-2 decoder of .* reads 4 channels, and the teacher's .* gives 8"):
        distill(_config(teacher_dir, photos, tmp_path / "c", collaborator=str(small)))
    dec = DecoderConfig(stage=2, out=str(tmp_path / "d"), images=str(photos), encoder=str(teacher_dir), init=str(small), crop=16,
                        resize=24, batch_size=2, steps=2, workers=0)  # fmt: skip
    for prune in ("fit", "l1"):  # fit widened it without a word; l1 raised "cannot keep 8 of 4 filters"
        with pytest.raises(ConfigError, match="^init: .* is narrower than the encoder's .* never widened"):
            train_decoder(dataclasses.replace(dec, prune=prune))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="afile: cannot be the run folder"):
        distill(_config(teacher_dir, photos, tmp_path / "e", run_dir=str(tmp_path / "afile")))
    assert not (tmp_path / "e").exists()  # checked before the model folder is claimed

    cfg = _config(teacher_dir, photos, tmp_path / "f", steps=3, lr_schedule="cosine")
    assert distill(cfg).outputs
    before = (tmp_path / "f" / "2SE.pth").stat().st_mtime_ns
    said: list[str] = []
    again = distill(cfg, resume=True, on_message=said.append)
    assert again.outputs == [] and (tmp_path / "f" / "2SE.pth").stat().st_mtime_ns == before  # already done: not rewritten
    assert not any("warning" in m for m in said)
    said.clear()
    longer = distill(dataclasses.replace(cfg, steps=5), resume=True, on_message=said.append)
    assert longer.train.step == 5 and longer.outputs
    assert any("cosine schedule spans all the steps: resumed with 5 steps (the run was started with 3)" in m for m in said), said


def test_sources_a_review_found_confusing_say_what_was_meant(teacher_dir, photos, tmp_path):
    from ultrastyle.distill.sources import load_encoder
    from ultrastyle.models.convert import CheckpointError

    with pytest.raises(CheckpointError, match="1SE.pth: a stage file of a model folder, not a whole VGG-19; give its folder"):
        load_encoder(teacher_dir / "1SE.pth", 1)  # it said "expected tensor '0.weight' for conv0"
    with pytest.raises(ConfigError, match="init: 'Fit' is none of fit, prune, random"):
        distill(_config(teacher_dir, photos, tmp_path / "a", init="Fit"))
    with pytest.raises(ConfigError, match="init: 'fit' is a way to thin a wider start"):  # it said "unknown model 'fit'"
        DecoderConfig(stage=2, out="o", images="i", encoder="e", init="fit").check()
    for bad in (-1.0, 0.0, 2.0):  # one rule: -1 said ">= 0", and then 0 was refused too
        with pytest.raises(ConfigError, match="^width_factor: expected a"):
            _config(teacher_dir, photos, tmp_path / "b", width_factor=bad).check()


def test_a_run_saved_with_a_setting_now_refused_still_resumes(teacher_dir, photos, tmp_path):
    # The review of this change: refusals added for settings a run does not read must not lock out a run saved before them.
    cfg = _config(teacher_dir, photos, tmp_path / "a", kd="mse", steps=2)
    distill(cfg)
    saved = tmp_path / "a" / "runs" / "2SE" / "config.yaml"
    saved.write_text(saved.read_text().replace("pixel_weight: 1.0", "pixel_weight: 1000.0"))  # as an older version saved it
    with pytest.raises(ConfigError, match="^pixel_weight: a setting of the collaborator's loss"):
        dataclasses.replace(cfg, pixel_weight=1000.0).check()  # a fresh run is refused
    again = distill(dataclasses.replace(cfg, steps=3), resume=True, explicit={"steps": 3})
    assert again.train.step == 3 and again.outputs
    r = CliRunner().invoke(app, ["distill", "-t", str(teacher_dir), "--stage", "2", "--images", str(photos), "-o", str(tmp_path / "a"),
                                 "--kd", "mse", "--pixel-weight", "1000", "--crop", "16", "--resize", "24", "-b", "2", "--steps", "4",
                                 "--workers", "0", "--resume"])  # fmt: skip
    assert r.exit_code == 0, r.output


def test_a_job_reports_its_set_up_time_apart_from_the_steps(teacher_dir, photos, tmp_path, monkeypatch):
    # A user review: a 76 s fit of the start, then "1 steps in 1 s".
    import time

    import ultrastyle.distill.jobs as jobs

    real_clock, real_init, skipped = time.perf_counter, jobs._student_init, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])  # the clock of the job and of its steps

    def slow_init(*args, **kwargs):  # fitting the start appears to take 100 s
        student = real_init(*args, **kwargs)
        skipped[0] += 100.0
        return student

    monkeypatch.setattr(jobs, "_student_init", slow_init)
    r = distill(_config(teacher_dir, photos, tmp_path / "a", steps=1))
    assert r.train.status == "done" and r.train.step == 1
    assert r.setup_seconds >= 100 > r.train.seconds, (r.setup_seconds, r.train.seconds)


def test_a_folder_whose_images_all_fail_to_decode_is_refused_before_the_run_folder_is_written(teacher_dir, photos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    _truncated_copy(photos / "p0.png", bad / "a.png")  # headers read: only decoding tells
    (bad / "b.png").write_bytes(b"")
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["train-decoder", "--stage", "1", "-e", str(teacher_dir), "--images", str(bad), "-o", str(out),
                                 "--crop", "16", "--resize", "24", "-b", "2", "--steps", "2", "--workers", "2"])  # fmt: skip
    assert r.exit_code == 2 and f"--images: no image in {bad} can be read" in " ".join(r.output.split()), r.output
    assert "a.png: truncated PNG" in r.output and not out.exists()  # a rerun with good photos is not blocked
    r = CliRunner().invoke(app, ["train-decoder", "--stage", "1", "-e", str(teacher_dir), "--images", str(photos), "-o", str(out),
                                 "--crop", "16", "--resize", "24", "-b", "2", "--steps", "2", "--workers", "0"])  # fmt: skip
    assert r.exit_code == 0, r.output


def test_an_error_in_the_loaders_workers_ends_the_command_rather_than_hanging_it(teacher_dir, photos, tmp_path):
    import subprocess
    import sys

    argv = ["ultrastyle", "train-decoder", "--stage", "1", "-e", str(teacher_dir), "--images", str(photos), "-o", str(tmp_path / "o"),
            "--crop", "16", "--resize", "24", "-b", "2", "--steps", "4", "--workers", "2", "--threads", "1"]  # fmt: skip
    code = ("import sys, ultrastyle.distill.data as data\n"
            "def broken(self, g):\n    raise data.DataError('broken in a worker')\n"
            "data.CropStream.__getitem__ = broken  # the workers fork with it: the probe before the run reads files, not this\n"
            f"sys.argv = {argv!r}\n"
            "from ultrastyle.cli.entry import main\nmain()\n")  # fmt: skip
    # At exit multiprocessing joined workers that ignore its SIGTERM, still held by the error's traceback: it never ended.
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "error: broken in a worker" in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout, r.stdout + r.stderr


def test_a_resume_takes_a_lower_learning_rate_its_threads_and_does_not_fit_the_start_again(teacher_dir, photos, tmp_path, monkeypatch):
    import ultrastyle.distill.jobs as jobs

    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2  # not what it is already: on a one-core runner, 1 proved nothing
    seen: list[int] = []
    first = distill(_config(teacher_dir, photos, tmp_path / "m", steps=2, threads=threads, init="fit"),
                    on_step=lambda r: seen.append(torch.get_num_threads()))  # fmt: skip
    assert first.train.step == 2 and set(seen) == {threads} and torch.get_num_threads() == before  # set for the job, then put back
    monkeypatch.setattr(jobs, "_student_init", lambda *a, **k: pytest.fail("the start was fitted again for a checkpoint that replaces it"))
    seen.clear()
    # "loss became inf ...; lower the learning rate and resume": the rate may change on resume (it was refused)
    again = distill(_config(teacher_dir, photos, tmp_path / "m", steps=4, lr=1e-4, init="fit"), resume=True,
                    explicit={"steps": 4, "lr": 1e-4}, on_step=lambda r: seen.append(torch.get_num_threads()))  # fmt: skip
    assert again.train.step == 4 and set(seen) == {threads}  # the run's saved threads, not given again
    rows = list(csv.DictReader(open(tmp_path / "m" / "runs" / "2SE" / "log.csv")))
    assert {float(r["lr"]) for r in rows if r["split"] == "train" and int(r["step"]) > 2} == {1e-4}
    assert yaml.safe_load((tmp_path / "m" / "runs" / "2SE" / "config.yaml").read_text())["lr"] == 1e-4


def test_a_fresh_run_over_an_earlier_runs_log_starts_a_new_log(teacher_dir, photos, tmp_path):
    run = tmp_path / "run"
    distill(_config(teacher_dir, photos, tmp_path / "a", steps=4, run_dir=str(run), kd="mse"))
    assert set(next(csv.DictReader(open(run / "log.csv")))) >= {"embed"}
    (run / "checkpoint.pt").unlink()  # as a damaged checkpoint's message says, to start the run again
    distill(_config(teacher_dir, photos, tmp_path / "b", steps=2, run_dir=str(run)))
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert {"pixel", "perceptual"} <= set(rows[0]) and [int(r["step"]) for r in rows if r["split"] == "train"] == [1, 2]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("date,amount\n")  # someone's own file, in the run folder they chose: kept, and said
    from ultrastyle.distill.trainer import RunFolderInUse

    with pytest.raises(RunFolderInUse, match="log.csv is no loss log of a run"):
        distill(_config(teacher_dir, photos, tmp_path / "c", steps=2, run_dir=str(mine)))
    assert (mine / "log.csv").read_text() == "date,amount\n"
    (mine / "log.csv").write_bytes(b"\xff\xfe\x00binary")  # not even text: the same, not a traceback
    with pytest.raises(RunFolderInUse, match="log.csv is no loss log of a run"):
        distill(_config(teacher_dir, photos, tmp_path / "c", steps=2, run_dir=str(mine)))


def test_a_folder_whose_only_decodable_image_is_for_validation_is_refused_before_any_work(teacher_dir, photos, tmp_path):
    from ultrastyle.distill.data import split_files

    d = tmp_path / "imgs"
    d.mkdir()
    names = [d / f"g{i}.png" for i in range(200)]
    train, val = split_files(names, 0.25)
    val[0].write_bytes((photos / "p0.png").read_bytes())  # hashed into validation
    _truncated_copy(photos / "p1.png", train[0])  # the training side's only image: its header reads, its data does not
    with pytest.raises(ConfigError, match=r"images: none of the 1 training images \(the other 1 are for validation\) in .* can be read \(see the "
                                          r"warnings above\); give a folder of photos, or val_fraction=0"):  # it failed mid-run, the run folder written
        distill(_config(teacher_dir, d, tmp_path / "o", steps=2, val_fraction=0.25, init="prune"))
    assert not (tmp_path / "o").exists()


def test_cli_errors_of_unused_settings_name_flags_and_a_key_the_file_lacks_is_not_blamed_on_it(teacher_dir, photos, tmp_path):
    runner = CliRunner()
    base = ["--stage", "1", "--images", str(photos), "-o", str(tmp_path / "o")]
    cases = [
        (["distill", "-t", str(teacher_dir), "--kd", "mse", "--collaborator", str(teacher_dir)],
         "--collaborator: a setting of the collaborator's loss, and --kd mse has no collaborator; give --kd cd or --kd cd+review, or leave it out"),
        (["distill", "-t", str(teacher_dir), "--student-arch", "cd64x", "--width-factor", "0.25"],
         "--width-factor: the student's widths are those of cd64x (--student-arch); leave it out"),
        (["train-decoder", "-e", str(teacher_dir), "--mode", "adain", "--style", str(photos), "--loss-encoder", str(teacher_dir)],
         "--loss-encoder: the network of the reconstruction's perceptual loss, and --mode adain measures its loss through the encoder"),
    ]  # fmt: skip
    for args, said in cases:  # they said "give kd cd", "leave student_arch out"; the loss encoder was saved though unused
        r = runner.invoke(app, args + base)
        assert r.exit_code == 2 and said in " ".join(r.output.split()), r.output
    cfg = tmp_path / "t.yaml"
    cfg.write_text("steps: 3\n")
    r = runner.invoke(app, ["train-decoder", "-c", str(cfg), "-e", str(teacher_dir), "--mode", "adain", *base])
    assert r.exit_code == 2 and "error: --style: AdaIN mode needs a folder of style images" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_start_is_fitted(teacher_dir, photos, tmp_path, monkeypatch):
    import ultrastyle.distill.jobs as jobs

    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(jobs, "_student_init", lambda *a, **k: pytest.fail("the start was fitted before OUT was found unusable"))
    with pytest.raises(OutputError, match=rf"{tmp_path / 'afile' / 'sub'} cannot be made: {tmp_path / 'afile'} is a file; it cannot be "
                                          r"the model folder: give another \(out\)"):  # fmt: skip
        distill(_config(teacher_dir, photos, tmp_path / "afile" / "sub", steps=2, init="fit"))
