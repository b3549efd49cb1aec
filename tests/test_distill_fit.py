"""Fitted pruning (distill.fit): channel choice, least-squares filters, fitted students and decoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ultrastyle.core.arch import ARCHS, ArchSpec
from ultrastyle.distill.fit import fit_conv, fit_decoder, fit_encoder, greedy_span
from ultrastyle.distill.prune import prune_decoder, prune_encoder
from ultrastyle.models.networks import Decoder, Encoder

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ArchSpec("tiny", (6, 8, 8, 8, 8))
TINY_STUDENT = TINY.student("tiny-x0.5", 0.5)


def _cov(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(1, keepdim=True)
    return v @ v.T / v.shape[1]


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean() / b.var())


# ---------------------------------------------------------------- channel choice


def test_greedy_span_keeps_channels_that_explain_the_dropped_ones():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 500, generator=g, dtype=torch.float64)
    x = torch.stack([a, b, a + b, 0.01 * c, 3 * c])  # 2 = 0 + 1; 3 and 4 are the same direction
    kept = greedy_span(_cov(x), 3)
    assert kept.tolist() == sorted(kept.tolist())
    assert 4 in kept.tolist() and 3 not in kept.tolist()  # of two collinear channels, the larger one
    # the kept channels explain every channel linearly (least squares with a bias)
    basis = torch.cat([x[kept], torch.ones(1, 500, dtype=torch.float64)]).T
    resid = x.T - basis @ torch.linalg.lstsq(basis, x.T).solution
    assert float(resid.abs().max()) < 1e-9
    for n in (0, 6):
        with pytest.raises(ValueError, match=f"cannot keep {n} of 5"):
            greedy_span(_cov(x), n)


# ---------------------------------------------------------------- least-squares filters


@pytest.mark.parametrize("kernel", [1, 3])
def test_fit_conv_recovers_a_known_conv(kernel):
    torch.manual_seed(0)
    known, fitted = torch.nn.Conv2d(4, 5, kernel), torch.nn.Conv2d(4, 5, kernel)
    x = torch.rand(3, 4, 12, 10)
    with torch.no_grad():
        target = known(F.pad(x, (kernel // 2,) * 4, mode="reflect") if kernel > 1 else x)
        err = fit_conv(fitted, x, target)
    assert err < 1e-6
    torch.testing.assert_close(fitted.weight, known.weight, atol=2e-3, rtol=0)
    torch.testing.assert_close(fitted.bias, known.bias, atol=2e-3, rtol=0)


def test_relu_refits_lower_the_error_behind_the_relu():
    """With half the inputs gone the fit is approximate; refitting for the ReLU helps what the ReLU passes on."""
    torch.manual_seed(1)
    teacher = torch.nn.Conv2d(8, 6, 3)
    x = torch.relu(torch.randn(4, 8, 16, 16))
    with torch.no_grad():
        target = teacher(F.pad(x, (1,) * 4, mode="reflect"))
        errs = [fit_conv(torch.nn.Conv2d(4, 6, 3), x[:, :4], target, relu=True, rounds=r) for r in (0, 3)]
    assert errs[1] < 0.97 * errs[0]


# ---------------------------------------------------------------- whole networks


def test_fit_encoder_at_the_teachers_widths_copies_it():
    torch.manual_seed(0)
    teacher = Encoder(TINY, 3).eval()
    student, kept = fit_encoder(teacher, TINY, _images(2, 32, 1))
    assert all(torch.equal(v, torch.arange(len(v))) for v in kept.values())
    x = _images(2, 32, 2)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


@pytest.mark.parametrize("stage", [2, 4])
def test_fitted_student_and_decoder_track_the_teacher_closer_than_l1_pruning(stage):
    """Held-out images: Q_k F' against F, and the student decoder against the teacher's on the teacher's features."""
    torch.manual_seed(stage)
    enc, dec = Encoder(TINY, stage).eval(), Decoder(TINY, stage).eval()
    cal, held = _images(8, 32, 3), _images(4, 32, 4)
    fitted, kept = fit_encoder(enc, TINY_STUDENT, cal)
    pruned = prune_encoder(enc, TINY_STUDENT)[0].eval()
    assert [len(kept[f"conv{b}1"]) for b in range(1, stage + 1)] == [TINY_STUDENT.width(stage, f"conv{b}1") for b in range(1, stage + 1)]
    q = f"conv{stage}1_aux"
    with torch.no_grad():
        f = enc(held)
        err_fit, err_prune = _rel(getattr(fitted, q)(fitted(held)), f), _rel(getattr(pruned, q)(pruned(held)), f)
        assert err_fit < 0.5 * err_prune
        sd = fit_decoder(dec, TINY_STUDENT, fitted(cal), enc(cal))
        pd = prune_decoder(dec, TINY_STUDENT, embed=getattr(pruned, q), calibrate=pruned(cal))
        target = dec(f)
        assert sd(fitted(held)).shape == target.shape
        assert _rel(sd(fitted(held)), target) < 0.5 * _rel(pd(pruned(held)), target)


def test_fitted_cd64x_student_of_the_real_cd16x_reconstructs_photos(cd16x_dir, shared_dir):
    """The benchmark's setting at toy scale: stage 2, 8 calibration crops of 64 px (measured: 14.4 dB fitted, 8.2 L1-pruned)."""
    from ultrastyle.distill.data import CropSettings, CropStream, list_images
    from ultrastyle.distill.metrics import psnr
    from ultrastyle.distill.sources import load_decoder, load_encoder

    files = list_images(shared_dir / "images" / "train")
    stream = CropStream(files[:8], CropSettings(crop=64, resize=96), seed=0)
    cal = torch.stack([stream[g] for g in range(8)])
    held = torch.stack([CropStream(files[-4:], CropSettings(crop=64, resize=96), seed=1)[g] for g in range(4)])
    teacher, dec = load_encoder(cd16x_dir, 2).eval(), load_decoder(cd16x_dir, 2).eval()
    student = fit_encoder(teacher, ARCHS["cd64x"], cal)[0]
    with torch.no_grad():
        sd = fit_decoder(dec, ARCHS["cd64x"], student(cal), teacher(cal))
        fitted = psnr(sd(student(held)).clamp(0, 1), held)
        pruned_enc = prune_encoder(teacher, ARCHS["cd64x"])[0].eval()
        pruned = psnr(dec(pruned_enc.conv21_aux(pruned_enc(held))).clamp(0, 1), held)
    assert fitted > pruned + 5.0, (fitted, pruned)
