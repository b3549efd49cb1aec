"""`ultrastyle-adain-16x`: this project's AdaIN decoder for the CD 16x stage-4 encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ultrastyle.core.canvas import canvas_from_array
from ultrastyle.core.plan import TilingOptions
from ultrastyle.core.styles import Regions, Target
from ultrastyle.distill.losses import adain, style_loss
from ultrastyle.io.images import load_image, resize_long_side
from ultrastyle.models import zoo
from ultrastyle.models.convert import cd_decoder, cd_encoder
from ultrastyle.models.defaults import ModelDefaults
from ultrastyle.models.pretrained import load_model
from ultrastyle.models.sources import model_defaults
from ultrastyle.runtime.backends.select import open_runner
from ultrastyle.runtime.cascade import style_statistics, stylize
from ultrastyle.runtime.tiled import stylize_tiled

NAME = "ultrastyle-adain-16x"
# float32 tolerance of fast paths against the PyTorch whole-image reference, in [0, 1].
ATOL = {torch.float32: 1e-4}


@pytest.fixture
def installed(cd16x_dir: Path) -> Path:
    zoo.import_local("cd-wct-16x", cd16x_dir)
    return zoo.ensure(NAME, progress=False)


@pytest.fixture(scope="module")
def pair(shared_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # Held out from training: the CD content photos and the cd_style_* paintings.
    content = resize_long_side(load_image(shared_dir / "images/content/cd_content_in1.jpg"), 200)
    style = resize_long_side(load_image(shared_dir / "images/style/cd_style_in3.jpg"), 200)
    return content, style


def test_adain_model_installs_from_the_package_and_the_cd16x_encoder_and_defaults_to_adain(installed):
    assert zoo.verify(NAME) == []
    assert sorted(p.name for p in installed.glob("*.pth")) == ["4SD.pth", "4SE.pth"]
    assert zoo.sha256_file(installed / "4SE.pth") == zoo.sha256_file(zoo.model_dir("cd-wct-16x") / "4SE.pth")
    assert model_defaults(NAME) == ModelDefaults("adain", (4,), 1.0)
    assert zoo.get_entry(NAME).total_bytes < 3 * 2**20  # the limit for committed weights


def test_adain_model_tiled_and_onnxruntime_equal_the_torch_whole_image_result(installed, pair):
    content, style = pair
    model = load_model(NAME)
    assert model.stages == (4,)
    stats = style_statistics(model, style, (4,))
    ref = stylize(model, content, stats, method="adain", alpha=1.0, levels=(4,))
    h, w = content.shape[-2:]
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[:, w // 3 :] = 1
    regions = Regions(mask.numpy(), (Target((stats,)), Target((style_statistics(model, content, (4,)),))))
    ref_masked = stylize(model, content, regions, method="adain", alpha=1.0, levels=(4,))
    for backend in ("torch", "onnxruntime"):
        with open_runner(NAME, backend=backend, progress=False) as runner:
            for style_arg, want in ((stats, ref), (regions, ref_masked)):
                with canvas_from_array(content.numpy(), layout="chw") as cv:
                    out = stylize_tiled(runner, cv, style_arg, TilingOptions(tile=64), method="adain", alpha=1.0, levels=(4,))
                    got = torch.from_numpy(out.numpy().copy())
                    out.close()
                diff = (got.clamp(0, 1) - want.clamp(0, 1)).abs().max()
                assert diff <= ATOL[torch.float32], f"{backend}: max {diff:.2e}"


def test_trained_decoder_has_a_lower_adain_loss_than_its_initialisation(installed, pair, cd16x_dir):
    # The decoder started from CD's WCT decoder 4SD; training must have improved
    # the AdaIN objective (content + 10 x style loss) on a pair it never saw.
    content, style = pair
    enc = cd_encoder(installed / "4SE.pth", 4)
    c, s = content[None], style[None]
    with torch.no_grad():
        s_taps = enc.taps(s)
        t = adain(enc(c), s_taps["relu4_1"])

        def loss(decoder) -> float:
            o_taps = enc.taps(decoder(t))
            return float(((o_taps["relu4_1"] - t) ** 2).mean() + 10 * style_loss(o_taps, s_taps))

        trained, init = loss(cd_decoder(installed / "4SD.pth", 4)), loss(cd_decoder(cd16x_dir / "4SD.pth", 4))
    assert trained < 0.9 * init, (trained, init)
