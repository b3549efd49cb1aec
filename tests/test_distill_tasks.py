"""Training tasks, student architectures, Q_k embeddings and L1 pruning."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from ultrastyle.distill.jobs import student_spec
from ultrastyle.distill.losses import adain, mean_std
from ultrastyle.distill.prune import l1_keep, prune_decoder, prune_encoder
from ultrastyle.distill.tasks import DecoderTask, StudentEncoderTask
from ultrastyle.distill.config import ConfigError
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.core.arch import ARCHS, ArchSpec


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ArchSpec("tiny", (6, 8, 8, 8, 8))  # no final ReLU: a random decoder must not start dead
TINY_STUDENT = TINY.student("tiny-x0.5", 0.5)


def _pair(spec: ArchSpec, stage: int, seed: int = 0) -> tuple[Encoder, Decoder]:
    torch.manual_seed(seed)
    return Encoder(spec, stage).eval(), Decoder(spec, stage).eval()


def _images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: a random low-resolution field, upsampled
    return torch.nn.functional.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear")


def _decreases(task, batch, steps: int = 12, lr: float = 1e-2) -> tuple[float, float]:
    opt = torch.optim.Adam(task.parameters_to_train(), lr=lr)
    task.train()
    first = None
    for _ in range(steps):
        loss = task(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        last = float(task(batch)["loss"])
    return first, last


# ---------------------------------------------------------------- architectures and Q_k


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_cd64x_student_halves_cd16x_and_its_q_maps_back_to_the_teacher(stage):
    teacher, student = ARCHS["cd16x"], ARCHS["cd64x"]
    assert student_spec(teacher) is student  # cd16x x 0.5 is the registered cd64x
    enc = Encoder(student, stage, aux=True)
    for b in range(1, stage + 1):
        conv = f"conv{b}1"
        s_w, t_w = student.width(stage, conv), teacher.width(stage, conv)
        assert s_w * 2 == t_w
        assert getattr(enc, conv).out_channels == s_w
        assert tuple(getattr(enc, f"{conv}_aux").weight.shape) == (t_w, s_w, 1, 1)
    assert (student.width(1, "conv11"), student.width(2, "conv11")) == (12, 8)  # stage 1's wider conv11, halved


def test_vgg19_quarter_student_has_cd16x_block_widths_and_q_to_vgg():
    spec = student_spec(ARCHS["vgg19"], width_factor=0.25)
    assert spec.widths == (16, 32, 64, 128, 128) and spec.teacher_widths == (64, 128, 256, 512, 512)
    assert [l.cout for l in spec.aux_layers(4)] == [64, 128, 256, 512]


def test_named_student_must_map_onto_the_teacher():
    assert student_spec(ARCHS["vgg19"], "cd16x") is ARCHS["cd16x"]
    with pytest.raises(ConfigError, match="cd16x is a student of another teacher: its Q_k embeddings map stage 1 conv11 to 64 channels, "
                                          "and cd16x has 24"):  # it said "cd16x's ... do not map onto cd16x"
        student_spec(ARCHS["cd16x"], "cd16x")
    with pytest.raises(ConfigError, match="vgg19 is a teacher's architecture"):
        student_spec(ARCHS["cd16x"], "vgg19")


# ---------------------------------------------------------------- pruning


def test_l1_keep_picks_the_largest_filters_in_index_order():
    w = torch.zeros(6, 2, 3, 3)
    for i, norm in enumerate([5.0, 1.0, 7.0, 3.0, 7.0, 0.5]):
        w[i, 0, 0, 0] = -norm if i % 2 else norm  # sign must not matter
    assert l1_keep(w, 3).tolist() == [0, 2, 4]
    assert l1_keep(w, 1).tolist() == [2]  # a tie goes to the lower index


def test_pruned_encoder_keeps_highest_l1_filters_and_slices_the_next_layer():
    teacher, _ = _pair(TINY, 2)
    student, kept = prune_encoder(teacher, TINY_STUDENT)
    for name in ("conv11", "conv12", "conv21"):
        t_w = getattr(teacher, name).weight
        norms = t_w.abs().flatten(1).sum(1)
        n = getattr(student, name).out_channels
        assert set(kept[name].tolist()) == set(norms.topk(n).indices.tolist())
    torch.testing.assert_close(student.conv12.weight, teacher.conv12.weight[kept["conv12"]][:, kept["conv11"]], rtol=0, atol=0)
    torch.testing.assert_close(student.conv21.bias, teacher.conv21.bias[kept["conv21"]], rtol=0, atol=0)


def test_pruned_stage1_student_through_its_q_equals_the_teacher_on_kept_channels():
    teacher, _ = _pair(TINY, 1)
    student, kept = prune_encoder(teacher, TINY_STUDENT)
    x = _images()
    with torch.no_grad():
        f, emb = teacher(x), student.conv11_aux(student(x))
    mask = torch.zeros(f.shape[1], dtype=torch.bool)
    mask[kept["conv11"]] = True
    torch.testing.assert_close(emb[:, mask], f[:, mask])
    assert float(emb[:, ~mask].abs().max()) == 0.0


def test_pruned_decoder_folds_q_into_its_first_conv():
    enc, dec = _pair(TINY, 1)
    student, _ = prune_encoder(enc, TINY_STUDENT)
    with torch.no_grad():
        student.conv11_aux.weight.normal_()
        student.conv11_aux.bias.normal_()
    sd = prune_decoder(dec, TINY_STUDENT, embed=student.conv11_aux)
    f = torch.rand(2, student.out_channels, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(sd(f), dec(student.conv11_aux(f)), rtol=1e-5, atol=1e-5)


def test_calibrated_pruned_decoder_tracks_the_teacher_closer():
    enc, dec = _pair(TINY, 3)
    student = prune_encoder(enc, TINY_STUDENT)[0]
    with torch.no_grad():
        feats = student(_images(n=4, size=32, seed=3))
        target = dec(student.conv31_aux(feats))
        plain = prune_decoder(dec, TINY_STUDENT, embed=student.conv31_aux)
        calibrated = prune_decoder(dec, TINY_STUDENT, embed=student.conv31_aux, calibrate=feats)
        assert torch.equal(plain.conv31.weight.abs() > 0, calibrated.conv31.weight.abs() > 0)  # same filters, rescaled
        err_plain = float(((plain(feats) - target) ** 2).mean())
        err_cal = float(((calibrated(feats) - target) ** 2).mean())
    assert err_cal < 0.5 * err_plain
    with pytest.raises(ValueError, match="needs the embedding"):
        prune_decoder(dec, TINY_STUDENT, calibrate=feats)


# ---------------------------------------------------------------- losses


def test_embedding_loss_is_exactly_zero_for_student_equal_teacher_with_identity_q():
    spec = ArchSpec("same", TINY.widths, decoder_final_relu=True, teacher_widths=TINY.widths)
    teacher, _ = _pair(TINY, 3)
    student = Encoder(spec, 3, aux=True)
    student.load_state_dict({**student.state_dict(), **teacher.state_dict()})
    with torch.no_grad():
        for layer in spec.aux_layers(3):
            q = getattr(student, layer.name)
            q.weight.copy_(torch.eye(layer.cout).reshape(layer.cout, layer.cin, 1, 1))
            q.bias.zero_()
    losses = StudentEncoderTask(teacher, student, None)({"content": _images(size=32)})
    assert float(losses["embed"].detach()) == 0.0 and float(losses["loss"].detach()) == 0.0
    with torch.no_grad():
        student.conv21_aux.weight.add_(0.01)  # and it notices a change
    assert float(StudentEncoderTask(teacher, student, None)({"content": _images(size=32)})["embed"].detach()) > 0


def test_adain_renormalises_to_the_style_statistics():
    c, s = torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8) * 3 + 1
    m, sd = mean_std(adain(c, s))
    sm, ssd = mean_std(s)
    torch.testing.assert_close(m, sm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd, ssd, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- each task learns


def test_collaborator_decoder_wct_loss_decreases():
    enc, dec = _pair(TINY, 2)
    task = DecoderTask(enc, dec)
    first, last = _decreases(task, {"content": _images()})
    assert last < 0.9 * first
    assert not any(p.requires_grad for p in enc.parameters())  # the encoder stays frozen


def test_collaborator_decoder_adain_loss_decreases_and_needs_styles():
    enc, dec = _pair(TINY, 3)
    task = DecoderTask(enc, dec, mode="adain")
    batch = {"content": _images(seed=1), "style": _images(seed=2)}
    losses = task(batch)
    assert set(losses) == {"loss", "content", "style"}
    first, last = _decreases(task, batch)
    assert last < 0.9 * first
    with pytest.raises(ValueError, match="style"):
        task({"content": batch["content"]})


@pytest.mark.parametrize("collaborate", [True, False])
def test_student_encoder_loss_decreases_and_only_the_student_learns(collaborate):
    enc, dec = _pair(TINY, 2)
    student = prune_encoder(enc, TINY_STUDENT)[0]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # start away from the pruned optimum
    frozen = copy.deepcopy((enc.state_dict(), dec.state_dict()))
    task = StudentEncoderTask(enc, student, dec if collaborate else None)
    batch = {"content": _images()}
    names = set(task(batch))
    assert names == ({"loss", "embed", "pixel", "perceptual"} if collaborate else {"loss", "embed"})
    first, last = _decreases(task, batch)
    assert last < 0.9 * first
    for before, net in zip(frozen, (enc, dec)):
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_student_encoder_adain_loss_decreases():
    enc, dec = _pair(TINY, 2)
    task = StudentEncoderTask(enc, prune_encoder(enc, TINY_STUDENT)[0], dec, mode="adain")
    batch = {"content": _images(seed=1), "style": _images(seed=2)}
    assert {"content", "style", "embed"} <= set(task(batch))
    first, last = _decreases(task, batch)
    assert last < 0.9 * first


def test_student_decoder_loss_decreases_with_the_teacher_as_loss_network():
    teacher, dec = _pair(TINY, 2)
    student = prune_encoder(teacher, TINY_STUDENT)[0]
    sd = prune_decoder(dec, TINY_STUDENT, embed=student.conv21_aux)
    task = DecoderTask(student, sd, loss_encoder=teacher)
    first, last = _decreases(task, {"content": _images()})
    assert last < 0.9 * first


def test_student_task_refuses_q_of_the_wrong_width():
    teacher, dec = _pair(ARCHS["cd16x"], 2)
    student = Encoder(TINY_STUDENT, 2, aux=True)  # Q_k maps to tiny's widths, not cd16x's
    with pytest.raises(ValueError, match="Q_1 maps to 6 channels, the teacher's relu1_1 has 16"):
        StudentEncoderTask(teacher, student, dec)


def test_real_cd16x_teacher_student_loss_decreases(cd16x_dir, shared_dir):
    """The real setting of the benchmark, at toy scale: cd16x stage 2 -> cd64x on 32 px photo crops."""
    from ultrastyle.distill.data import CropSettings, CropStream, list_images
    from ultrastyle.distill.sources import load_decoder, load_encoder

    files = list_images(shared_dir / "images" / "train")[:4]
    stream = CropStream(files, CropSettings(crop=32, resize=64), seed=0)
    batch = {"content": torch.stack([stream[g] for g in range(4)])}
    teacher, dec = load_encoder(cd16x_dir, 2), load_decoder(cd16x_dir, 2)
    task = StudentEncoderTask(teacher, prune_encoder(teacher, ARCHS["cd64x"])[0], dec)
    first, last = _decreases(task, batch, steps=8, lr=1e-3)
    assert last < 0.9 * first


@pytest.mark.parametrize("mode, setting, value", [("wct", "style", "styles/"), ("wct", "style_weight", 5.0), ("wct", "content_weight", 2.0),
                                                  ("adain", "pixel_weight", 5.0), ("adain", "perceptual_weight", 3.0)])  # fmt: skip
def test_a_setting_of_the_other_decoder_mode_is_refused_not_saved_and_ignored(mode, setting, value):
    # train-decoder --style without --mode adain trained a WCT decoder, with the style folder in config.yaml.
    from ultrastyle.distill.config import DecoderConfig

    base = dict(encoder="e", stage=4, out="o", images="i", mode=mode, style="styles/" if mode == "adain" else None)
    DecoderConfig(**base).check()
    with pytest.raises(ConfigError, match=f"^{setting}: a setting of {'adain' if mode == 'wct' else 'wct'} mode"):
        DecoderConfig(**{**base, setting: value}).check()


@pytest.mark.parametrize("settings, refused", [
    (dict(kd="mse", collaborator="m/"), "collaborator: a setting of the collaborator's loss, and kd='mse' has no collaborator"),
    (dict(kd="review", pixel_weight=1000.0), "pixel_weight: a setting of the collaborator's loss, and kd='review'"),
    (dict(kd="review", mode="adain", style="s/"), "mode: a setting of the collaborator's loss"),
    (dict(kd="cd", review_weight=5.0), "review_weight: a setting of knowledge review, which kd='cd' leaves out"),
    (dict(student_arch="cd64x", width_factor=0.25), "width_factor: the student's widths are those of cd64x (student_arch)"),
    (dict(beta=0.0, pixel_weight=0.0, perceptual_weight=0.0), "beta: 0, with pixel_weight and perceptual_weight 0 too"),
    (dict(warmup_steps=50, steps=5), "warmup_steps: 50 is more than the 5 steps"),
    (dict(collaborate="no"), "collaborate: expected True or False, got 'no'"),
])  # fmt: skip
def test_distill_settings_a_run_would_save_but_not_use_are_refused(settings, refused):
    # A user review: each was accepted, saved in config.yaml as if used, and ignored (or, collaborate="no", read two ways).
    from ultrastyle.distill.config import DistillConfig

    base = dict(teacher="t", stage=4, out="o", images="i")
    DistillConfig(**base).check()
    with pytest.raises(ConfigError, match="^" + re.escape(refused)):
        DistillConfig(**{**base, **settings}).check()


def test_decoder_settings_a_run_would_not_use_are_refused():
    from ultrastyle.distill.config import DecoderConfig

    base = dict(encoder="e", stage=4, out="o", images="i")
    with pytest.raises(ConfigError, match=r"^prune: how a wider start decoder is thinned, and the start is random \(init\)"):
        DecoderConfig(**base, prune="l1").check()
    DecoderConfig(**base, prune="l1", init="cd-wct-16x").check()
    with pytest.raises(ConfigError, match="^pixel_weight: 0, with perceptual_weight 0 too, leaves nothing to train"):
        DecoderConfig(**base, pixel_weight=0.0, perceptual_weight=0.0).check()


def test_named_choices_are_taken_in_any_case_as_the_command_line_takes_them():
    from ultrastyle.distill.config import DecoderConfig, DistillConfig

    c = DistillConfig(teacher="t", stage=4, out="o", images="i", mode="WCT", kd="CD+Review", lr_schedule="Cosine", device="CPU")
    c.check()  # ConfigError before: "mode: must be one of wct, adain, got 'WCT'"
    assert (c.mode, c.kd, c.lr_schedule, c.device) == ("wct", "cd+review", "cosine", "cpu")
    assert DecoderConfig(encoder="e", stage=4, out="o", images="i", prune="L1").prune == "l1"
