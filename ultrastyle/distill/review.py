"""Knowledge review: attention-based fusion (ABF) of student taps and the hierarchical context loss (HCL).

Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021): same-level
feature matching is a bottleneck, so the teacher's lower-level features also
supervise the student's higher levels. The student's taps are processed from
the deepest level down; at each level an `ABF` module fuses the student's own
tap with the running map from the deeper levels (residual learning: the deeper
levels already explain part of this level's teacher features, this level
learns the rest), and predicts the teacher's tap at that level. `hcl`
compares each prediction with the teacher after spatial-pyramid pooling.

The ABF modules (`ReviewHead`) exist only in training: they are the task's
``helpers``, checkpointed with the run but never written into the model
folder, so the deployed student graph is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HCL_LEVELS = (4, 2, 1)  # pyramid pooling sizes after the full-resolution term


class ABF(nn.Module):
    """Attention-based fusion at one tap.

    ``x`` (N, C_s, H, W): the student's tap; ``deeper`` (N, M, h, w) or None:
    the fused map of the level below (deeper, coarser). Returns ``(out, fused)``:
    ``out`` (N, C_t, H, W), the prediction of the teacher's tap, and ``fused``
    (N, M, H, W), passed on to the next shallower level.

    ``x`` is projected to M channels (1x1 conv); with a deeper map, that map is
    resized to (H, W), a 1x1 conv on the concatenation predicts two sigmoid
    attention maps and the fused map is their weighted sum; a 3x3 conv maps
    it to the teacher's width.
    """

    def __init__(self, student_width: int, mid_width: int, teacher_width: int, fuse: bool) -> None:
        super().__init__()
        self.project = nn.Conv2d(student_width, mid_width, 1)
        self.attention = nn.Conv2d(2 * mid_width, 2, 1) if fuse else None
        self.predict = nn.Conv2d(mid_width, teacher_width, 3, padding=1)

    def forward(self, x: torch.Tensor, deeper: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.project(x)
        if self.attention is not None:
            if deeper is None:
                raise ValueError("this ABF fuses a deeper map: pass it")
            # nearest, as the reference: the deeper map is coarser by whole factors of 2
            deeper = F.interpolate(deeper, size=fused.shape[-2:], mode="nearest")
            att = torch.sigmoid(self.attention(torch.cat([fused, deeper], 1)))
            fused = fused * att[:, :1] + deeper * att[:, 1:]
        return self.predict(fused), fused


class ReviewHead(nn.Module):
    """The ABF modules of one stage: ``student_widths[b]`` -> ``teacher_widths[b]`` at taps relu1_1..relu{k}_1.

    ``mid_width`` is the width of the fused maps (the reference uses the
    student's deepest width, capped at 512); the deepest level has no fusion.
    """

    def __init__(self, student_widths: Sequence[int], teacher_widths: Sequence[int], mid_width: int = 0) -> None:
        super().__init__()
        if len(student_widths) != len(teacher_widths) or not student_widths:
            raise ValueError(f"one width per tap in both: student {list(student_widths)}, teacher {list(teacher_widths)}")
        mid = mid_width or min(512, student_widths[-1])
        if mid < 1:
            raise ValueError(f"mid_width must be positive, got {mid_width}")
        last = len(student_widths) - 1
        self.abfs = nn.ModuleList(ABF(s, mid, t, fuse=b < last) for b, (s, t) in enumerate(zip(student_widths, teacher_widths)))
        self.mid_width = mid

    def forward(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student taps, shallowest first, each (N, C_s[b], H_b, W_b) -> teacher-width predictions (N, C_t[b], H_b, W_b), same order."""
        if len(taps) != len(self.abfs):
            raise ValueError(f"expected {len(self.abfs)} taps, got {len(taps)}")
        outs: list[torch.Tensor] = [torch.empty(0)] * len(taps)
        fused = None
        for b in reversed(range(len(taps))):  # deepest first: residual learning downwards
            outs[b], fused = self.abfs[b](taps[b], fused)
        return outs


def hcl(found: Sequence[torch.Tensor], target: Sequence[torch.Tensor], levels: Sequence[int] = HCL_LEVELS) -> torch.Tensor:
    """Hierarchical context loss: Σ over taps of a weighted mean of MSEs over a spatial pyramid.

    For each pair of (N, C, H, W) maps: the full-resolution MSE (weight 1) and
    the MSE after adaptive average pooling to l x l for each l in ``levels``
    smaller than H (weights 1/2, 1/4, ...), divided by the sum of the weights
    used. Zero exactly when the maps are equal.
    """
    total = torch.zeros((), device=found[0].device if found else None)
    for f, t in zip(found, target, strict=True):
        t = t.detach()
        loss = F.mse_loss(f, t)
        weight, weights = 1.0, 1.0
        for size in levels:
            if size >= f.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f, size), F.adaptive_avg_pool2d(t, size))
            weights += weight
        total = total + loss / weights
    return total


def review_loss(head: ReviewHead, student_taps: Mapping[str, torch.Tensor], teacher_taps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """HCL between the head's fused predictions from ``student_taps`` and ``teacher_taps`` (both keyed relu{b}_1)."""
    names = sorted(teacher_taps)
    return hcl(head([student_taps[n] for n in names]), [teacher_taps[n] for n in names])
