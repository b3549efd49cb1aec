"""Quantization-aware fine-tuning (`ultrastyle.calibration.qat`): the simulation matches ONNX Runtime's Q/DQ
graphs, fine-tuning lowers the simulated int8 error on held-out tiles, and it is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrastyle.calibration.data import FeedReader, TileSampler, calibration_images
from ultrastyle.calibration.qat import (
    FakeQuantNet,
    FinetuneSettings,
    fake_quantize_weight,
    finetune_for_int8,
    qparams,
    quant_plan,
)
from ultrastyle.calibration.quantize import CalibrationSettings, quantize_graph
from ultrastyle.export.graph import build_graph
from ultrastyle.export.spec import ExportSpec
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.onnxruntime_backend import EXACT_INT8


@pytest.fixture(scope="module")
def model(cd16x_dir):
    return load_cd_folder(cd16x_dir, stages=(1, 2))


@pytest.fixture(scope="module")
def images(shared_dir):
    files = calibration_images(shared_dir / "images" / "train")[:6]
    return TileSampler(tuple(files), image_size=192).images()


def test_plan_keeps_the_ends_float(model):
    enc, dec = quant_plan(model.encoders[2], "ends"), quant_plan(model.decoders[2], "ends")
    assert "conv0" not in enc.weights and "conv0" in enc.outputs and not enc.quantize_input
    assert enc.outputs[-1] == "conv21" and "conv21" in enc.weights
    assert dec.quantize_input and "conv11" not in dec.weights and "conv11" not in dec.outputs
    everything = quant_plan(model.encoders[2], "transform")
    assert "conv0" in everything.weights and everything.quantize_input


def test_weight_grid_and_qparams():
    w = torch.randn(4, 3, 3, 3)
    q = fake_quantize_weight(w)
    scale = w.abs().amax((1, 2, 3)) / 127
    steps = q / scale[:, None, None, None]
    assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert torch.allclose(q.abs().amax((1, 2, 3)), w.abs().amax((1, 2, 3)))
    assert qparams(0.0, 2.55) == pytest.approx((0.01, 0))
    scale, zero = qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zero == round(255 / 4)


def test_simulation_matches_onnxruntime(model, images, tmp_path):
    """Same activation scales as ONNX Runtime's percentile calibration, and outputs close to its int8 graph."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    net = model.encoders[2]
    spec = next(n for n in ExportSpec(stages=(2,)).networks({2: 32}, None) if n.kind == "encoder")
    src, dst = tmp_path / "encoder2.onnx", tmp_path / "encoder2.int8.onnx"
    onnx.save(build_graph(net, spec, opset=ExportSpec().opset), src)
    xs = [im[None, :, :64, :64].contiguous() for im in images[:3]]
    quantize_graph(src, dst, "encoder", FeedReader([{"image": x.numpy()} for x in xs]), CalibrationSettings())
    sim = FakeQuantNet(net)
    ranges = sim.calibrate(xs)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(dst).graph.initializer}
    ort_scales = sorted(float(v) for n, v in inits.items() if n.endswith("_scale") and "weight" not in n)
    sim_scales = sorted(qparams(*r)[0] for r in ranges.values())
    np.testing.assert_allclose(sim_scales, ort_scales, rtol=1e-3)
    x = images[3][None, :, :64, :64].contiguous()
    ref = net(x).detach()
    options = ort.SessionOptions()
    options.add_session_config_entry(*EXACT_INT8)  # as the runner runs int8 graphs (u8 x s8 saturates without VNNI)
    got = torch.from_numpy(ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        simulated = sim(x)
    int8_err = float(((got - ref) ** 2).mean())
    assert int8_err > 0
    assert float(((simulated - got) ** 2).mean()) < 0.3 * int8_err  # the simulation is much closer to int8 than int8 to fp32


SMALL = FinetuneSettings(steps=24, batch=2, tile=64, lr=1e-5, calibration_tiles=2, recalibrate_every=8)


def test_finetuning_reduces_the_simulated_int8_error(model, images):
    before = {k: v.clone() for k, v in model.encoders[2].state_dict().items()}
    tuned, report = finetune_for_int8(model, images, SMALL, stages=(2,))
    assert set(report.before) == {"encoder2", "decoder2"}
    assert report.after["encoder2"] < report.before["encoder2"]
    assert report.after["decoder2"] < report.before["decoder2"]
    assert tuned.stages == (2,)
    after = model.encoders[2].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original model is left alone
    changed = tuned.encoders[2].state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_finetuning_is_deterministic(model, images):
    s = FinetuneSettings(steps=3, batch=1, tile=48, calibration_tiles=1)
    a, _ = finetune_for_int8(model, images, s, stages=(1,))
    b, _ = finetune_for_int8(model, images, s, stages=(1,))
    c, _ = finetune_for_int8(model, images, FinetuneSettings(**{**s.__dict__, "seed": 1}), stages=(1,))
    sa, sb, sc = a.decoders[1].state_dict(), b.decoders[1].state_dict(), c.decoders[1].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="decoder_input"):
        FinetuneSettings(decoder_input="nope")
    with pytest.raises(ValueError, match="steps"):
        FinetuneSettings(steps=-1)
