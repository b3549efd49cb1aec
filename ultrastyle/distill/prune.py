"""L1-norm filter pruning: a thinner copy of a network as the student's starting point.

Each conv keeps the filters (output channels) with the largest L1 norm of the
*teacher's* full filter (Li et al., "Pruning Filters for Efficient ConvNets",
2017; the rule of CD's ``tools/prune.py``), in their original order; the next
conv's input channels are sliced to the same kept set, so the pruned network
computes exactly the teacher's kept channels up to the first pruned layer.

For a distillation student the Q_k embeddings start as the selection matrix
that puts student channel ``i`` back where it came from in the teacher
(``Q[keep[i], i] = 1``, bias 0), so ``Q F'`` is the teacher's features with the
pruned channels zeroed: a meaningful start for the collaborator loss.
"""

from __future__ import annotations

import torch
from torch import nn

from ultrastyle.core.arch import ArchSpec
from ultrastyle.models.networks import Decoder, Encoder


def l1_keep(weight: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted ascending) of the ``n`` filters of ``weight`` (O, I, kh, kw) with the largest L1 norm.

    Ties go to the lower index, so the choice is deterministic.
    """
    if not 0 < n <= weight.shape[0]:
        raise ValueError(f"cannot keep {n} of {weight.shape[0]} filters; expected 1..{weight.shape[0]}")
    norms = weight.detach().abs().flatten(1).sum(1).double()
    # stable sort on -norm: equal norms keep index order
    order = torch.sort(-norms, stable=True).indices[:n]
    return torch.sort(order).values


def _copy_conv(dst: nn.Conv2d, src: nn.Conv2d, rows: torch.Tensor, cols: torch.Tensor) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight[rows][:, cols])
        dst.bias.copy_(src.bias[rows])


def prune_encoder(teacher: Encoder, spec: ArchSpec, *, aux: bool = True) -> tuple[Encoder, dict[str, torch.Tensor]]:
    """``teacher`` pruned to ``spec``'s widths: (student encoder, kept teacher channels per conv name).

    With ``aux`` (and teacher widths in ``spec``) the Q_k layers are built and
    set to the selection matrices (see module doc); their output widths must
    match the teacher's relu{b}_1 widths.
    """
    stage = teacher.stage
    student = Encoder(spec, stage, aux=aux and spec.teacher_widths is not None)
    kept: dict[str, torch.Tensor] = {}
    prev = torch.arange(3)
    for layer in student.layers:
        if layer.kind != "conv":
            continue
        t_conv: nn.Conv2d = getattr(teacher, layer.name)
        if t_conv.out_channels < layer.cout:
            raise ValueError(
                f"cannot prune {layer.name} of {teacher.spec.name} stage {stage} ({t_conv.out_channels} filters) "
                f"to {layer.cout}: the student is wider"
            )
        keep = l1_keep(t_conv.weight, layer.cout) if t_conv.out_channels != layer.cout else torch.arange(layer.cout)
        _copy_conv(getattr(student, layer.name), t_conv, keep, prev)
        kept[layer.name] = keep
        prev = keep
    for layer in spec.aux_layers(stage) if aux else []:
        conv = f"conv{layer.name[4]}1"
        t_width = getattr(teacher, conv).out_channels
        if layer.cout != t_width:
            raise ValueError(
                f"{spec.name}'s {layer.name} maps to {layer.cout} channels, but the teacher's {conv} "
                f"in stage {stage} has {t_width}: the student's teacher widths do not match this teacher"
            )
        q: nn.Conv2d = getattr(student, layer.name)
        with torch.no_grad():
            q.weight.zero_()
            q.bias.zero_()
            q.weight[kept[conv], torch.arange(layer.cin), 0, 0] = 1.0
    return student, kept


def prune_decoder(
    teacher: Decoder,
    spec: ArchSpec,
    *,
    inputs: torch.Tensor | None = None,
    embed: nn.Conv2d | None = None,
    calibrate: torch.Tensor | None = None,
) -> Decoder:
    """``teacher`` (a decoder) pruned to ``spec``'s widths.

    The first conv reads the student's features, chosen one of three ways:
    ``embed`` (a student's Q_k, student -> teacher width) is folded into it, so
    that ``pruned_first_conv(f') == teacher_first_conv(Q f')`` before its output
    filters are pruned; else ``inputs`` (the kept channel indices of the
    student encoder's relu{k}_1) slices it; else its input channels with the
    largest L1 norm are kept (CD's rule for decoders). Every later conv keeps
    its highest-L1 filters; the last conv keeps its 3 outputs.

    ``calibrate`` (with ``embed``): student features (N, C', h, w) of a few
    images. Pruning a conv's inputs shrinks and shifts its outputs, and the
    error compounds over a deep decoder (a pruned stage-5 decoder alone gave
    6 dB where the teacher through Q gave 11). So, conv by conv, each kept
    output channel gets the per-channel affine correction (least squares, a
    scale of its filter and a new bias) that best matches its pre-activation
    to the teacher's on those images, the teacher decoding ``Q f'``.
    """
    stage = teacher.stage
    student = Decoder(spec, stage)
    convs = [l for l in student.layers if l.kind == "conv"]
    prev: torch.Tensor | None = None
    kept: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(convs):
        t_conv: nn.Conv2d = getattr(teacher, layer.name)
        s_conv: nn.Conv2d = getattr(student, layer.name)
        rows = torch.arange(layer.cout) if t_conv.out_channels == layer.cout else l1_keep(t_conv.weight, layer.cout)
        if i == 0 and embed is not None:
            w, b = t_conv.weight.detach(), t_conv.bias.detach()
            q, qb = embed.weight.detach()[:, :, 0, 0], embed.bias.detach()
            if q.shape != (w.shape[1], layer.cin):
                raise ValueError(f"embedding {tuple(q.shape)} does not map {layer.cin} student channels to the decoder's {w.shape[1]}")
            # conv(pad(Q f + qb)) = conv_{W Q}(pad f) + Σ W qb: reflection padding keeps a constant constant.
            with torch.no_grad():
                s_conv.weight.copy_(torch.einsum("otij,ts->osij", w, q)[rows])
                s_conv.bias.copy_((b + torch.einsum("otij,t->o", w, qb))[rows])
        else:
            if i == 0:
                cols = inputs if inputs is not None else l1_keep(t_conv.weight.transpose(0, 1), layer.cin)
            else:
                cols = prev
            _copy_conv(s_conv, t_conv, rows, cols)
        kept[layer.name] = rows
        prev = rows
    if calibrate is not None:
        if embed is None:
            raise ValueError("calibrating a pruned decoder needs the embedding Q_k (the teacher's input)")
        _calibrate(student, teacher, kept, calibrate, embed)
    return student


@torch.no_grad()
def _calibrate(student: Decoder, teacher: Decoder, kept: dict[str, torch.Tensor], feats: torch.Tensor, embed: nn.Conv2d) -> None:
    xs, xt = feats, embed(feats)
    for s_layer, t_layer in zip(student.layers, teacher.layers):
        if s_layer.kind != "conv":
            xs, xt = student._layer(s_layer, xs), teacher._layer(t_layer, xt)
            continue
        s_conv: nn.Conv2d = getattr(student, s_layer.name)
        t_conv: nn.Conv2d = getattr(teacher, t_layer.name)
        zs = s_conv(torch.nn.functional.pad(xs, (1, 1, 1, 1), mode="reflect"))
        zt_all = t_conv(torch.nn.functional.pad(xt, (1, 1, 1, 1), mode="reflect"))
        zt = zt_all[:, kept[s_layer.name]]
        ms, mt = zs.mean((0, 2, 3)), zt.mean((0, 2, 3))
        cov = ((zs - ms[None, :, None, None]) * (zt - mt[None, :, None, None])).mean((0, 2, 3))
        var = zs.var((0, 2, 3), unbiased=False)
        # a dead channel (no variance on these images) keeps its scale and only gets the offset
        a = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.ones_like(var))
        s_conv.weight.mul_(a[:, None, None, None])
        s_conv.bias.copy_(a * s_conv.bias + mt - a * ms)
        zs = a[None, :, None, None] * zs + (mt - a * ms)[None, :, None, None]
        xs = torch.relu(zs) if s_layer.relu else zs
        xt = torch.relu(zt_all) if t_layer.relu else zt_all
