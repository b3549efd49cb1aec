"""Knowledge review: ABF shapes, the hierarchical context loss, training, resume and the exported student."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.core.arch import ARCHS, ArchSpec
from ultrastyle.distill.config import ConfigError, DistillConfig
from ultrastyle.distill.jobs import distill
from ultrastyle.distill.outputs import claim_folder, write_network
from ultrastyle.distill.prune import prune_encoder
from ultrastyle.distill.review import ABF, ReviewHead, hcl
from ultrastyle.distill.tasks import StudentEncoderTask
from ultrastyle.distill.trainer import read_checkpoint
from ultrastyle.models.networks import Decoder, Encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ArchSpec("tinyteacher", (6, 8, 8, 8, 8))
TINY_STUDENT = TINY.student("tiny-x0.5", 0.5)


def _images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


# ---------------------------------------------------------------- ABF and HCL


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_review_head_predicts_every_teacher_tap_of_the_cd64x_student(stage):
    teacher, student = ARCHS["cd16x"], ARCHS["cd64x"]
    s_w = [student.width(stage, f"conv{b}1") for b in range(1, stage + 1)]
    t_w = [teacher.width(stage, f"conv{b}1") for b in range(1, stage + 1)]
    assert s_w != t_w
    torch.manual_seed(0)
    enc = Encoder(student, stage)
    taps = list(enc.taps(torch.rand(2, 3, 32, 48)).values())
    head = ReviewHead(s_w, t_w)
    assert head.mid_width == s_w[-1]
    outs = head(taps)
    assert [tuple(o.shape) for o in outs] == [(2, t_w[b], *taps[b].shape[-2:]) for b in range(stage)]
    # only the deepest level lacks fusion; a shallower level depends on the deeper taps
    assert [a.attention is None for a in head.abfs] == [b == stage - 1 for b in range(stage)]
    if stage > 1:
        changed = [t.clone() for t in taps]
        changed[-1] = changed[-1] + 1.0
        assert not torch.allclose(head(changed)[0], outs[0])


def test_abf_fuses_a_coarser_map_and_refuses_to_run_without_it():
    abf = ABF(4, 6, 10, fuse=True)
    out, fused = abf(torch.rand(1, 4, 8, 12), torch.rand(1, 6, 4, 6))
    assert out.shape == (1, 10, 8, 12) and fused.shape == (1, 6, 8, 12)
    with pytest.raises(ValueError, match="deeper map"):
        abf(torch.rand(1, 4, 8, 12))
    with pytest.raises(ValueError, match="one width per tap"):
        ReviewHead([4, 8], [8])


def test_hcl_is_zero_for_identical_maps_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 5, 16, 16, generator=g), torch.rand(2, 7, 8, 8, generator=g), torch.rand(2, 3, 1, 1, generator=g)]
    assert float(hcl(maps, [m.clone() for m in maps])) == 0.0
    shifted = [m + 0.1 for m in maps]
    # a constant offset: every pyramid term is 0.01, so each weighted mean is 0.01
    assert float(hcl(maps, shifted)) == pytest.approx(0.03, rel=1e-5)
    noisy = [m + 0.05 * torch.randn(m.shape, generator=g) for m in maps]
    assert float(hcl(maps, noisy)) > 0
    # the pooled terms see what the full-resolution one weighs less: a mean shift on one tap
    one = [maps[0] + 0.2, maps[1], maps[2]]
    assert float(hcl(maps, one)) == pytest.approx(0.04, rel=1e-5)


# ---------------------------------------------------------------- the task


@pytest.mark.parametrize("with_collaborator", [False, True], ids=["review", "cd+review"])
def test_review_loss_decreases_and_the_frozen_networks_do_not_move(with_collaborator):
    torch.manual_seed(0)
    teacher, decoder = Encoder(TINY, 2).eval(), Decoder(TINY, 2).eval()
    student = prune_encoder(teacher, TINY_STUDENT)[0]
    head = ReviewHead([student.conv11.out_channels, student.conv21.out_channels], [6, 8])
    task = StudentEncoderTask(teacher, student, decoder if with_collaborator else None, beta=1.0, review=head, review_weight=1.0)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    abf_before = {k: v.clone() for k, v in head.state_dict().items()}
    batch = {"content": _images(size=16)}
    opt = torch.optim.Adam(task.parameters_to_train(), lr=1e-2)
    first = task(batch)
    assert {"loss", "embed", "review"} <= set(first) and ({"pixel", "perceptual"} <= set(first)) == with_collaborator
    reviews = []
    for _ in range(30):
        losses = task(batch)
        reviews.append(float(losses["review"].detach()))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    with torch.no_grad():
        last = task(batch)
    assert float(last["review"]) < 0.8 * reviews[0], reviews
    assert float(last["loss"]) < float(first["loss"].detach())
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(abf_before[k], v) for k, v in head.state_dict().items())  # the ABF modules learn


def test_with_review_the_embedding_loss_fits_q_without_reaching_the_student():
    torch.manual_seed(0)
    teacher = Encoder(TINY, 2).eval()
    student = prune_encoder(teacher, TINY_STUDENT)[0]
    head = ReviewHead([3, 4], [6, 8])
    task = StudentEncoderTask(teacher, student, None, beta=1.0, review=head, review_weight=0.0)
    task(({"content": _images(size=16)}))["loss"].backward()
    assert float(student.conv21_aux.weight.grad.abs().sum()) > 0
    assert student.conv21.weight.grad is None or float(student.conv21.weight.grad.abs().sum()) == 0


def test_review_settings_are_checked():
    base = dict(stage=2, out="o", images="i", teacher="t")
    for kw, msg in (({"kd": "kr"}, "kd: must be one of"), ({"kd": "review", "collaborate": False}, "contradicts"),
                    ({"kd": "review", "review_weight": 0.0}, "nothing to train"), ({"review_width": -1}, "review_width")):  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            DistillConfig(**base, **kw).check()
    assert DistillConfig(**base, collaborate=False).method == "mse"
    assert DistillConfig(**base, kd="cd+review").collaborates and DistillConfig(**base, kd="cd+review").reviews


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory):
    d = claim_folder(tmp_path_factory.mktemp("teacher"), TINY)
    torch.manual_seed(0)
    for k in (1, 2):
        write_network(d, f"{k}SE.pth", Encoder(TINY, k))
        write_network(d, f"{k}SD.pth", Decoder(TINY, k))
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.BILINEAR).save(d / f"p{i}.png")
    return d


def _config(teacher_dir, photos, out, **kw) -> DistillConfig:
    base = dict(stage=2, out=str(out), images=str(photos), teacher=str(teacher_dir), crop=16, resize=24, batch_size=2, steps=6,
                checkpoint_every=2, log_every=1, workers=0, lr=1e-3, val_fraction=0.25, kd="cd+review")  # fmt: skip
    return DistillConfig(**{**base, **kw})


def test_review_run_resumed_equals_an_uninterrupted_one_and_exports_only_the_student(teacher_dir, photos, tmp_path):
    whole = distill(_config(teacher_dir, photos, tmp_path / "a"))
    assert whole.train.status == "done"

    class Crash(Exception):
        pass

    def crash_at_5(r):
        if r.step == 5:
            raise Crash  # a killed process: step 5 is lost, the checkpoint of step 4 is not

    cfg = _config(teacher_dir, photos, tmp_path / "b")
    with pytest.raises(Crash):
        distill(cfg, on_step=crash_at_5)
    ck = read_checkpoint(tmp_path / "b" / "runs" / "2SE" / "checkpoint.pt")
    assert ck["step"] == 4 and {"abfs.0.attention.weight", "abfs.1.predict.weight"} <= set(ck["helpers"])
    done = distill(cfg, resume=True)
    assert done.train.status == "done" and done.train.step == 6
    a = torch.load(tmp_path / "a" / "2SE.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "2SE.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and not any("abf" in k for k in a)  # the deployed student: no ABF
    assert set(a) == set(Encoder(TINY_STUDENT, 2, aux=True).state_dict())
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    rows = list(csv.DictReader(open(done.run_dir / "log.csv")))
    ref = list(csv.DictReader(open(whole.run_dir / "log.csv")))
    assert "review" in rows[0] and float(rows[0]["review"]) > 0
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in ref]


def test_cli_kd_review_student_exports_and_stylizes_through_onnxruntime(teacher_dir, photos, tmp_path):
    runner = CliRunner()
    out = tmp_path / "student"
    common = ["--images", str(photos), "-o", str(out), "--stage", "1,2", "--steps", "3", "--crop", "16", "--resize", "24",
              "--batch-size", "2", "--workers", "0"]  # fmt: skip
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--kd", "review", "--review-weight", "2", "--review-width", "5", *common])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "runs" / "2SE" / "config.yaml").read_text())
    assert (saved["kd"], saved["review_weight"], saved["review_width"]) == ("review", 2.0, 5)
    header = next(csv.DictReader(open(out / "runs" / "2SE" / "log.csv")))
    assert {"review", "embed"} <= set(header) and "pixel" not in header  # no collaborator with kd review
    r = runner.invoke(app, ["distill", "-t", str(teacher_dir), "--kd", "review", "--no-collaborate", *common, "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--no-collaborate contradicts --kd review (use --kd mse" in " ".join(r.output.split()), r.output  # flags, as typed
    r = runner.invoke(app, ["train-decoder", "-e", str(out), "--loss-encoder", str(teacher_dir), "--init", str(teacher_dir), *common])
    assert r.exit_code == 0, r.output

    img = tmp_path / "c.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).resize((30, 26), Image.BILINEAR).save(img)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        r = runner.invoke(app, ["stylize", str(img), "--style", str(img), "--model", str(out), "--levels", "2,1",
                                "--backend", backend, "--style-size", "0", "-o", str(tmp_path / backend)])  # fmt: skip
        assert r.exit_code == 0, r.output
        (png,) = (tmp_path / backend).iterdir()
        outs[backend] = np.asarray(Image.open(png), np.int16)
    assert outs["torch"].shape == (26, 30, 3)
    assert np.abs(outs["torch"] - outs["onnxruntime"]).max() <= 1  # 8-bit output: one level of rounding
