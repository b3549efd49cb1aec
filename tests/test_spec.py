"""Architectures as data: layer lists and widths of the VGG-19 and CD 16x families."""

import pytest
import torch

from ultrastyle.core.arch import ARCHS, get_arch
from ultrastyle.models.networks import Decoder, Encoder


@pytest.mark.parametrize("stage,channels", [(1, 24), (2, 32), (3, 64), (4, 128), (5, 128)])
def test_cd16x_feature_channels_follow_width_table_with_stage1_override(stage, channels):
    assert ARCHS["cd16x"].feature_channels(stage) == channels


@pytest.mark.parametrize("stage,channels", [(1, 64), (2, 128), (3, 256), (4, 512), (5, 512)])
def test_vgg19_feature_channels(stage, channels):
    assert ARCHS["vgg19"].feature_channels(stage) == channels


def test_encoder_stops_after_conv_k1_with_pools_before_blocks():
    layers = ARCHS["vgg19"].encoder_layers(4)
    names = [l.name or l.kind for l in layers]
    assert names == ["conv0", "conv11", "conv12", "pool", "conv21", "conv22", "pool",
                     "conv31", "conv32", "conv33", "conv34", "pool", "conv41"]  # fmt: skip
    assert not layers[0].relu and layers[0].kernel == 1


def test_decoder_mirrors_encoder_and_final_relu_is_per_family():
    for arch, final_relu in [("vgg19", False), ("cd16x", True)]:
        spec = ARCHS[arch]
        dec = spec.decoder_layers(3)
        assert [l.name or l.kind for l in dec] == ["conv31", "up", "conv22", "conv21", "up", "conv12", "conv11"]
        assert dec[-1].cout == 3 and dec[-1].relu is final_relu
        assert all(l.relu for l in dec[:-1] if l.kind == "conv")
        enc = {l.name: l for l in spec.encoder_layers(3) if l.kind == "conv"}
        assert all((l.cin, l.cout) == (enc[l.name].cout, enc[l.name].cin) for l in dec if l.kind == "conv")


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_encoder_decoder_shapes_round_trip(stage):
    spec = ARCHS["cd16x"]
    enc, dec = Encoder(spec, stage), Decoder(spec, stage)
    x = torch.rand(2, 3, 64, 96)
    f = enc(x)
    g = spec.grid(stage)
    assert f.shape == (2, spec.feature_channels(stage), 64 // g, 96 // g)
    assert dec(f).shape == x.shape


def test_encoder_taps_name_every_relu_k1_up_to_the_stage():
    taps = Encoder(ARCHS["cd16x"], 4).taps(torch.rand(1, 3, 32, 32))
    assert list(taps) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1"]
    assert [t.shape[1] for t in taps.values()] == [16, 32, 64, 128]


def test_aux_layers_map_student_width_to_teacher_width():
    enc = Encoder(ARCHS["cd16x"], 5, aux=True)
    assert tuple(enc.conv41_aux.weight.shape) == (512, 128, 1, 1)
    assert tuple(enc.conv11_aux.weight.shape) == (64, 16, 1, 1)
    assert not Encoder(ARCHS["vgg19"], 5, aux=True).state_dict().keys() - Encoder(ARCHS["vgg19"], 5).state_dict().keys()


def test_unknown_arch_and_stage_are_rejected_with_the_known_values():
    with pytest.raises(KeyError, match="cd16x"):
        get_arch("resnet")
    with pytest.raises(ValueError, match="stage must be one of"):
        ARCHS["cd16x"].encoder_layers(6)
