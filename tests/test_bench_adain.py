"""benchmarks/adain_decoder.py: its loss terms are the AdaIN training task's, and its contact sheet lays out a grid."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from ultrastyle.core.arch import ARCHS
from ultrastyle.distill.losses import adain
from ultrastyle.models.networks import Decoder, Encoder

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_adain_decoder", REPO / "benchmarks" / "adain_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_loss_terms_match_decoder_task(one_thread):
    bench = _bench()
    torch.manual_seed(0)
    enc, dec = Encoder(ARCHS["cd16x"], 4).eval(), Decoder(ARCHS["cd16x"], 4).eval()
    c, s = torch.rand(1, 3, 32, 40), torch.rand(1, 3, 24, 32)
    with torch.no_grad():
        style_taps = enc.taps(s)
        t = adain(enc(c), style_taps["relu4_1"])
        found = bench.adain_terms(enc, dec(t), t, style_taps)
    bench.check_against_task(enc, dec, c, s, found)  # raises if they differ
    assert not any(p.requires_grad for p in dec.parameters())


def test_contact_sheet_grid_and_spacing():
    bench = _bench()
    assert bench.spaced(list(range(15)), 4) == [0, 5, 9, 14]
    assert bench.spaced([1, 2], 4) == [1, 2]
    img = {k: torch.rand(3, 40, 60) for k in ("content", "style", "trained", "untrained")}
    cols = [(k, k) for k in img]
    sheet = bench.contact_sheet([(img, "a.jpg", "b.jpg")] * 3, cols, "caption " * 40, cell=64)
    assert sheet.width == 4 * 64
    assert sheet.height > 3 * 64 + 2 * 14  # header and a wrapped caption
