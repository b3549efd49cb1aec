"""Training tasks: modules whose ``forward(batch)`` returns a dict of named losses.

``batch`` is ``{"content": (N, 3, H, W)}`` plus ``"style"`` in AdaIN mode,
images in [0, 1], H and W multiples of the stage's pooling grid. Every task
returns its weighted total under ``"loss"`` (the one to minimise) and each
unweighted term under its own name; logging happens outside, in the trainer.
Frozen networks are kept in eval mode with ``requires_grad=False``; gradients
still flow *through* them to the trained network.

The three tasks of Collaborative Distillation (Wang et al., CVPR 2020):

1. `DecoderTask` with the teacher as encoder: the teacher's collaborator decoder.
2. `StudentEncoderTask`: a thin student whose Q_k-embedded features the frozen
   collaborator decodes, plus β Σ_b ||F_b − Q_b F'_b||².
3. `DecoderTask` with the trained student as encoder (and, as in CD, the
   teacher for the perceptual loss): the student's own decoder (SD).

`StudentEncoderTask` also takes a knowledge-review head (`review.ReviewHead`,
Chen et al., CVPR 2021) in place of, or beside, the collaborator: see `KD_METHODS`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ultrastyle.distill.losses import adain, mse, perceptual_loss, style_loss
from ultrastyle.distill.review import ReviewHead, review_loss
from ultrastyle.models.networks import Decoder, Encoder

Mode = Literal["wct", "adain"]
Batch = dict[str, torch.Tensor]

# Student-encoder distillation methods: what supervises the student.
KD_METHODS = {
    "cd": "collaborator decoder through Q_k + beta * same-level embedding loss (Collaborative Distillation)",
    "review": "knowledge review: ABF fusion from the deepest tap down + HCL against every teacher tap",
    "cd+review": "collaborator decoder through Q_k + knowledge review",
    "mse": "same-level embedding loss only (plain feature distillation)",
}


def freeze(net: nn.Module) -> nn.Module:
    net.eval()
    net.requires_grad_(False)
    return net


class Task(nn.Module):
    """Base: ``trained`` is the one network whose weights the optimiser updates."""

    trained: nn.Module
    # Training-only modules optimised with ``trained`` (e.g. ABF): checkpointed, never exported.
    helpers: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        # An instance attribute, not a class default: nn.Module keeps submodules in
        # _modules, which a class-level None would shadow.
        self.helpers = None

    def parameters_to_train(self) -> list[nn.Parameter]:
        nets = [self.trained] if self.helpers is None else [self.trained, self.helpers]
        return [p for net in nets for p in net.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> Task:
        # Only the trained networks ever switch mode; frozen ones stay in eval.
        self.training = mode
        self.trained.train(mode)
        if self.helpers is not None:
            self.helpers.train(mode)
        return self


def _need_style(batch: Batch) -> torch.Tensor:
    if "style" not in batch:
        raise ValueError("AdaIN mode needs style images: give a style folder")
    return batch["style"]


class DecoderTask(Task):
    """Train ``decoder`` to invert the frozen ``encoder`` of one stage.

    WCT mode (``pixel_weight`` ||D(E(c)) − c||² + ``perceptual_weight``
    Σ_b ||L_b(D(E(c))) − L_b(c)||², with L = ``loss_encoder``, default the
    encoder itself): the decoders of the WCT cascade.

    AdaIN mode: ``t = AdaIN(E(c), E(s))``, ``o = D(t)``; ``content_weight``
    ||E(o) − t||² at relu{k}_1 + ``style_weight`` Σ_b mean/std losses between
    E_b(o) and E_b(s) over relu1_1 .. relu{k}_1 (Huang & Belongie 2017). Both
    use the encoder itself (its features define the target ``t``).
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        *,
        loss_encoder: Encoder | None = None,
        mode: Mode = "wct",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        content_weight: float = 1.0,
        style_weight: float = 10.0,
    ) -> None:
        super().__init__()
        if decoder.in_channels != encoder.out_channels:
            raise ValueError(f"decoder reads {decoder.in_channels} channels, the encoder gives {encoder.out_channels}")
        if loss_encoder is not None and loss_encoder.stage != encoder.stage:
            raise ValueError(f"loss encoder is stage {loss_encoder.stage}, the encoder stage {encoder.stage}")
        self.encoder = freeze(encoder)
        self.loss_encoder = freeze(loss_encoder) if loss_encoder is not None else None
        self.trained = self.decoder = decoder.requires_grad_(True)
        self.mode = mode
        self.weights = dict(pixel=pixel_weight, perceptual=perceptual_weight, content=content_weight, style=style_weight)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = batch["content"]
        w = self.weights
        if self.mode == "wct":
            lenc = self.loss_encoder or self.encoder
            with torch.no_grad():
                f = self.encoder(c)
                target = lenc.taps(c)
            rec = self.decoder(f)
            pixel = mse(rec, c)
            perceptual = perceptual_loss(lenc.taps(rec), target)
            return {"loss": w["pixel"] * pixel + w["perceptual"] * perceptual, "pixel": pixel, "perceptual": perceptual}
        s = _need_style(batch)
        with torch.no_grad():
            style_taps = self.encoder.taps(s)
            t = adain(self.encoder(c), style_taps[f"relu{self.encoder.stage}_1"])
        out_taps = self.encoder.taps(self.decoder(t))
        content = mse(out_taps[f"relu{self.encoder.stage}_1"], t)
        style = style_loss(out_taps, style_taps)
        return {"loss": w["content"] * content + w["style"] * style, "content": content, "style": style}


class StudentEncoderTask(Task):
    """Collaborative Distillation of ``student`` (an `Encoder` built with ``aux=True``) from ``teacher``.

    ``L = L_collab + β Σ_b ||F_b − Q_b F'_b||²`` over b = 1..k, where F_b is the
    teacher's relu{b}_1, F'_b the student's and Q_b its ``conv{b}1_aux`` (1x1,
    no activation). The frozen collaborator ``decoder`` sees ``Q_k F'_k``, so
    the collaborator loss reaches the student through it:

    - WCT mode: ``pixel_weight`` ||D(Q_k F'_k) − c||² + ``perceptual_weight``
      Σ_b ||T_b(D(Q_k F'_k)) − T_b(c)||² (T: the teacher), as in CD;
    - AdaIN mode: the AdaIN loss of ``D(AdaIN(Q_k F'_k(c), Q_k F'_k(s)))``,
      measured with the teacher (see `DecoderTask`).

    ``decoder=None`` leaves only the embedding loss: plain feature
    distillation, the baseline CD improves on.

    With a ``review`` head (knowledge review), ``review_weight`` * HCL of the
    head's predictions against every teacher tap supervises the student's
    features instead of the same-level embedding loss: that loss then reads
    the student's taps detached, so it only fits the Q_b (they stay the
    linear read-out the teacher's decoder and a pruned decoder start use).
    The collaborator loss, if any, still reaches the student through Q_k.
    """

    def __init__(
        self,
        teacher: Encoder,
        student: Encoder,
        decoder: Decoder | None,
        *,
        beta: float = 10.0,
        review: ReviewHead | None = None,
        review_weight: float = 1.0,
        mode: Mode = "wct",
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        content_weight: float = 1.0,
        style_weight: float = 10.0,
    ) -> None:
        super().__init__()
        k = teacher.stage
        if student.stage != k:
            raise ValueError(f"student is stage {student.stage}, the teacher stage {k}")
        for b in range(1, k + 1):
            q = getattr(student, f"conv{b}1_aux", None)
            if q is None:
                raise ValueError(f"the student has no conv{b}1_aux (Q_{b}); build it with aux=True and teacher widths")
            t_width = getattr(teacher, f"conv{b}1").out_channels
            if q.out_channels != t_width:
                raise ValueError(f"Q_{b} maps to {q.out_channels} channels, the teacher's relu{b}_1 has {t_width}")
        if decoder is not None and decoder.in_channels != teacher.out_channels:
            raise ValueError(f"collaborator decoder reads {decoder.in_channels} channels, the teacher gives {teacher.out_channels}")
        if review is not None and len(review.abfs) != k:
            raise ValueError(f"review head has {len(review.abfs)} levels, stage {k} has {k} taps")
        self.teacher = freeze(teacher)
        self.decoder = freeze(decoder) if decoder is not None else None
        self.trained = self.student = student.requires_grad_(True)
        self.helpers = self.review = review.requires_grad_(True) if review is not None else None
        self.stage, self.beta, self.review_weight, self.mode = k, beta, review_weight, mode
        self.weights = dict(pixel=pixel_weight, perceptual=perceptual_weight, content=content_weight, style=style_weight)

    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Q_b F'_b for b = 1..k: the student's taps in the teacher's width."""
        return self._embed(self.student.taps(x))

    def _embed(self, taps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: getattr(self.student, f"conv{name[4]}1_aux")(f) for name, f in taps.items()}

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        c = batch["content"]
        last = f"relu{self.stage}_1"
        with torch.no_grad():
            t_taps = self.teacher.taps(c)
        s_taps = self.student.taps(c)
        emb = self._embed(s_taps)
        out: dict[str, torch.Tensor] = {}
        if self.review is None:
            out["embed"] = perceptual_loss(emb, t_taps)
        else:
            # Review supervises the features; the embedding loss only fits Q_b (detached taps).
            out["embed"] = perceptual_loss(self._embed({n: f.detach() for n, f in s_taps.items()}), t_taps)
            out["review"] = review_loss(self.review, s_taps, t_taps)
        total = self.beta * out["embed"]
        if "review" in out:
            total = total + self.review_weight * out["review"]
        w = self.weights
        if self.decoder is not None and self.mode == "wct":
            rec = self.decoder(emb[last])
            out["pixel"] = mse(rec, c)
            out["perceptual"] = perceptual_loss(self.teacher.taps(rec), t_taps)
            total = total + w["pixel"] * out["pixel"] + w["perceptual"] * out["perceptual"]
        elif self.decoder is not None:
            s = _need_style(batch)
            with torch.no_grad():
                style_taps = self.teacher.taps(s)
            t = adain(emb[last], self.embed(s)[last])
            o_taps = self.teacher.taps(self.decoder(t))
            out["content"] = mse(o_taps[last], t.detach())  # a target, not a way to move t
            out["style"] = style_loss(o_taps, style_taps)
            total = total + w["content"] * out["content"] + w["style"] * out["style"]
        out["loss"] = total
        return out
