"""Data-driven pruning: a thinner network fitted to the teacher's activations, layer by layer.

L1 filter pruning (`prune`) keeps filters by weight norm and copies them; the
copied filters then read inputs that already lost channels, and the error
compounds (an untrained cd64x student read through the teacher's decoder gives
10-12 dB). Here, on a few calibration images, teacher and student run side by
side, conv by conv:

- **which channels stay**: the teacher's post-activation channels that span
  the others best, picked greedily by the largest residual variance (pivoted
  Cholesky of their covariance, i.e. the pivots of a column-pivoted QR). A
  channel the others already explain linearly is the one to drop, because
  the next layer's refit can take it from them.
- **their filters**: refitted by (ridge) least squares so that the student
  conv, reading the student's own inputs, reproduces the teacher's
  pre-activations of the kept channels.

This is the channel-pruning-with-reconstruction family (He et al., "Channel
Pruning for Accelerating Very Deep Neural Networks", ICCV 2017; ThiNet,
ICCV 2017), with a greedy spanning selection in place of LASSO. The student's
Q_k embeddings are fitted the same way: student ``relu{b}_1`` -> all of the
teacher's. A decoder is fitted to the teacher's decoder reading the teacher's
own features, while the student decoder reads the student encoder's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ultrastyle.core.arch import ArchSpec, Layer
from ultrastyle.models.networks import Decoder, Encoder, _StageNet, reflect_pad

RELU_ROUNDS = 3  # refits for the ReLU (see fit_conv)
RIDGE = 1e-5  # times the mean diagonal of the Gram matrix: only stabilises rank-deficient fits


def greedy_span(cov: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted) of ``n`` variables that best span the rest, from their covariance (C, C).

    Each pick is the variable with the largest variance not yet explained
    linearly by the picks so far (pivoted Cholesky; ties go to the lower index).
    """
    c = cov.shape[0]
    if not 0 < n <= c:
        raise ValueError(f"cannot keep {n} of {c} channels; expected 1..{c}")
    a = cov.double().clone()
    picked: list[int] = []
    resid = torch.diagonal(a).clone()
    for _ in range(n):
        r = resid.clone()
        if picked:
            r[picked] = -1.0
        j = int(torch.argmax(r))
        picked.append(j)
        piv = a[j, j]
        if piv <= 1e-12 * max(float(cov.diagonal().abs().max()), 1e-30):
            continue  # nothing left to explain: the rest are (near) linear in the picks
        col = a[:, j] / piv.sqrt()
        a -= torch.outer(col, col)
        resid = torch.diagonal(a).clone()
    return torch.sort(torch.tensor(picked)).values


def _patches(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(N*L, C*k*k + 1): every output position's receptive field (reflection-padded) and a 1 for the bias."""
    x = reflect_pad(x, kernel // 2)
    u = F.unfold(x, kernel).transpose(1, 2).reshape(-1, x.shape[1] * kernel * kernel)
    return torch.cat([u, torch.ones(u.shape[0], 1, dtype=u.dtype)], 1)


def fit_conv(conv: nn.Conv2d, x: torch.Tensor, target: torch.Tensor, *, relu: bool = False, rounds: int = RELU_ROUNDS, chunk: int = 4) -> float:
    """Set ``conv``'s weight and bias to the least-squares fit ``conv(pad(x)) ≈ target``; returns the relative error.

    ``x`` (N, Cin, H, W) is the conv's input, ``target`` (N, Cout, H, W) the
    pre-activation to reproduce. Normal equations in float64 over chunks of
    ``chunk`` images, with a small ridge (`RIDGE`). With ``relu`` the fit is
    refined ``rounds`` times for what the ReLU passes on: where the target is
    negative, any negative output is as good as the target, so the target
    there becomes ``min(output, 0)`` and the fit is solved again (the error
    returned is then that of the ReLU outputs).
    """
    k = conv.kernel_size[0]
    d = conv.in_channels * k * k + 1
    gram = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        p = _patches(x[i : i + chunk], k).double()
        gram += p.T @ p
    ridge = RIDGE * float(torch.diagonal(gram)[:-1].mean().clamp_min(1e-12))
    reg = torch.full((d,), ridge, dtype=torch.float64)
    reg[-1] = 0.0  # the bias is not shrunk
    chol = torch.linalg.cholesky(gram + torch.diag(reg))

    def solve(goal: Callable[[int, int], torch.Tensor]) -> None:
        cross = torch.zeros(d, conv.out_channels, dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            p = _patches(x[i : i + chunk], k).double()
            cross += p.T @ goal(i, i + chunk).permute(0, 2, 3, 1).reshape(-1, conv.out_channels).double()
        sol = torch.cholesky_solve(cross, chol)  # (d, Cout)
        with torch.no_grad():
            # unfold's column order is (cin, kh, kw): the conv weight's own layout
            conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape).float())
            conv.bias.copy_(sol[-1].float())

    with torch.no_grad():
        solve(lambda a, b: target[a:b])
        for _ in range(rounds if relu else 0):
            solve(lambda a, b: torch.where(target[a:b] > 0, target[a:b], conv(reflect_pad(x[a:b], k // 2)).clamp(max=0)))
        out = conv(reflect_pad(x, k // 2))
        if relu:
            out, target = F.relu(out), F.relu(target)
        return float((out - target).pow(2).mean() / target.var().clamp_min(1e-12))


def _covariance(x: torch.Tensor) -> torch.Tensor:
    v = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    v = v - v.mean(1, keepdim=True)
    return (v @ v.T) / v.shape[1]


@torch.no_grad()
def fit_chain(
    student: _StageNet, teacher: _StageNet, xs: torch.Tensor, xt: torch.Tensor, *, on_tap: Callable[[Layer, torch.Tensor, torch.Tensor], None] | None = None
) -> dict[str, torch.Tensor]:
    """Fit every conv of ``student`` to ``teacher``'s (same layer list, thinner); returns the kept channels per conv.

    ``xs`` / ``xt``: the two networks' inputs (N, C, H, W) on the calibration
    images. A conv as wide as the teacher's, reading the very same inputs, is
    copied; the others keep `greedy_span`'s channels and are refitted by
    `fit_conv`. ``on_tap(layer, xs, xt)`` sees each conv's post-activation
    outputs (the encoder fits its Q_k there).
    """
    same = xs.shape == xt.shape and torch.equal(xs, xt)
    kept: dict[str, torch.Tensor] = {}
    for s_layer, t_layer in zip(student.layers, teacher.layers, strict=True):
        if s_layer.kind != "conv":
            xs, xt = student._layer(s_layer, xs), teacher._layer(t_layer, xt)
            continue
        s_conv: nn.Conv2d = getattr(student, s_layer.name)
        t_conv: nn.Conv2d = getattr(teacher, t_layer.name)
        zt = t_conv(reflect_pad(xt, t_layer.kernel // 2))
        at = F.relu(zt) if t_layer.relu else zt
        n = s_conv.out_channels
        rows = torch.arange(n) if n == t_conv.out_channels else greedy_span(_covariance(at), n)
        if same and n == t_conv.out_channels:
            s_conv.weight.copy_(t_conv.weight)
            s_conv.bias.copy_(t_conv.bias)
        else:
            fit_conv(s_conv, xs, zt[:, rows], relu=s_layer.relu)
            same = False
        kept[s_layer.name] = rows
        xs, xt = student._layer(s_layer, xs), at
        if on_tap is not None:
            on_tap(s_layer, xs, xt)
    return kept


def fit_encoder(teacher: Encoder, spec: ArchSpec, images: torch.Tensor) -> tuple[Encoder, dict[str, torch.Tensor]]:
    """A student encoder of ``spec``'s widths fitted to ``teacher`` on ``images`` (N, 3, H, W): (student, kept channels).

    H and W must be multiples of ``spec.grid(stage)``. The Q_k embeddings are
    the least-squares maps from the student's ``relu{b}_1`` to the teacher's.
    """
    student = Encoder(spec, teacher.stage, aux=spec.teacher_widths is not None)
    student.eval()

    def fit_q(layer: Layer, xs: torch.Tensor, xt: torch.Tensor) -> None:
        q = getattr(student, f"{layer.name}_aux", None)
        if q is not None:
            fit_conv(q, xs, xt)

    kept = fit_chain(student, teacher.eval(), images, images, on_tap=fit_q)
    return student, kept


def fit_decoder(teacher: Decoder, spec: ArchSpec, student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> Decoder:
    """A decoder of ``spec``'s widths reading ``student_feats`` and fitted to ``teacher`` reading ``teacher_feats``.

    Both (N, C, h, w) of the same calibration images: the student encoder's
    features and the teacher encoder's.
    """
    student = Decoder(spec, teacher.stage).eval()
    fit_chain(student, teacher.eval(), student_feats, teacher_feats)
    return student
