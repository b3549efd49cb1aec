"""Checkpoint converters on synthetic state dicts of the real shapes and on the published files."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ultrastyle.core.arch import ARCHS
from ultrastyle.models import convert
from ultrastyle.models.networks import Decoder, Encoder


def _random_like(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stage", [1, 3, 5])
def test_cd_encoder_file_loads_weights_and_drops_aux_for_inference(tmp_path, stage):
    sd = _random_like(Encoder(ARCHS["cd16x"], stage, aux=True))
    path = tmp_path / f"{stage}SE.pth"
    torch.save({"model": sd, "epoch": 20}, path)
    enc = convert.cd_encoder(path, stage)
    assert not any("_aux" in k for k in enc.state_dict())
    assert torch.equal(enc.state_dict()[f"conv{stage}1.weight"], sd[f"conv{stage}1.weight"])
    with_aux = convert.cd_encoder(path, stage, aux=True)
    assert torch.equal(with_aux.state_dict()["conv11_aux.weight"], sd["conv11_aux.weight"])


def test_cd_pruned_base_raw_state_dict_loads(tmp_path):
    enc_sd = _random_like(Encoder(ARCHS["cd16x"], 2, aux=True))
    dec_sd = _random_like(Decoder(ARCHS["cd16x"], 2))
    torch.save(enc_sd, tmp_path / "e2_base.pth")
    torch.save(dec_sd, tmp_path / "d2_base.pth")
    assert torch.equal(convert.cd_encoder(tmp_path / "e2_base.pth", 2, aux=True).conv21_aux.bias, enc_sd["conv21_aux.bias"])
    assert torch.equal(convert.cd_decoder(tmp_path / "d2_base.pth", 2).conv21.weight, dec_sd["conv21.weight"])


def test_wrong_file_error_lists_expected_and_found_shapes(tmp_path):
    sd = _random_like(Decoder(ARCHS["cd16x"], 3))
    sd["conv22.weight"] = torch.zeros(8, 32, 3, 3)
    path = tmp_path / "3SD.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(convert.CheckpointError) as err:
        convert.cd_decoder(path, 3)
    msg = str(err.value)
    assert str(path) in msg
    assert "conv22.weight: expected (32, 32, 3, 3), found (8, 32, 3, 3)" in msg
    with pytest.raises(convert.CheckpointError, match=r"conv31.weight: expected \(32, 64, 3, 3\), found nothing"):
        torch.save({"model": _random_like(Decoder(ARCHS["cd16x"], 2))}, path)
        convert.cd_decoder(path, 3)


class _NotATensor:
    pass


def test_pickled_objects_are_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _NotATensor()}, path)
    with pytest.raises(convert.CheckpointError, match="not a readable PyTorch weight file"):
        convert.read_state_dict(path)


def test_garbage_and_missing_files_are_named_in_the_error(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.CheckpointError, match="x.pth: not a readable"):
        convert.read_state_dict(tmp_path / "x.pth")
    with pytest.raises(convert.CheckpointError, match="no such weight file"):
        convert.read_state_dict(tmp_path / "missing.pth")


TV_SHAPES = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
             16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512), 25: (512, 512), 28: (512, 512),
             30: (512, 512), 32: (512, 512), 34: (512, 512)}  # fmt: skip


def _torchvision_vgg19_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i, (cout, cin) in TV_SHAPES.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # ignored
    return sd


def test_torchvision_vgg19_folds_imagenet_normalisation_into_conv0(tmp_path):
    sd = _torchvision_vgg19_sd()
    torch.save(sd, tmp_path / "vgg19.pth")
    enc = convert.torchvision_vgg19_encoder(tmp_path / "vgg19.pth", 2)
    x = torch.rand(1, 3, 16, 16)
    mean = torch.tensor(convert.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(convert.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.conv0(x), (x - mean) / std)
    # relu1_1 equals torchvision's conv on normalised input (reflect-padded, as in WCT encoders).
    ref = F.relu(F.conv2d(F.pad((x - mean) / std, (1, 1, 1, 1), mode="reflect"), sd["features.0.weight"], sd["features.0.bias"]))
    torch.testing.assert_close(enc.taps(x)["relu1_1"], ref, atol=1e-5, rtol=1e-5)
    assert enc(x).shape == (1, 128, 8, 8)


ADAIN_VGG_SHAPES = {0: (3, 3, 1), 2: (64, 3, 3), 5: (64, 64, 3), 9: (128, 64, 3), 12: (128, 128, 3), 16: (256, 128, 3),
                    19: (256, 256, 3), 22: (256, 256, 3), 25: (256, 256, 3), 29: (512, 256, 3), 32: (512, 512, 3),
                    35: (512, 512, 3), 38: (512, 512, 3), 42: (512, 512, 3), 45: (512, 512, 3)}  # fmt: skip
ADAIN_DEC_SHAPES = {1: (256, 512), 5: (256, 256), 8: (256, 256), 11: (256, 256), 14: (128, 256), 18: (128, 128),
                    21: (64, 128), 25: (64, 64), 28: (3, 64)}  # fmt: skip


def test_pytorch_adain_vgg_normalised_and_decoder_load_by_sequential_index(tmp_path):
    g = torch.Generator().manual_seed(2)
    vgg = {}
    for i, (cout, cin, k) in ADAIN_VGG_SHAPES.items():
        vgg[f"{i}.weight"], vgg[f"{i}.bias"] = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
    dec = {}
    for i, (cout, cin) in ADAIN_DEC_SHAPES.items():
        dec[f"{i}.weight"], dec[f"{i}.bias"] = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
    torch.save(vgg, tmp_path / "vgg_normalised.pth")
    torch.save(dec, tmp_path / "decoder.pth")
    enc = convert.adain_vgg_encoder(tmp_path / "vgg_normalised.pth", 4)
    assert torch.equal(enc.conv0.weight, vgg["0.weight"]) and torch.equal(enc.conv41.bias, vgg["29.bias"])
    d = convert.adain_decoder(tmp_path / "decoder.pth")
    assert torch.equal(d.conv34.weight, dec["5.weight"]) and torch.equal(d.conv11.bias, dec["28.bias"])
    assert d(enc(torch.rand(1, 3, 32, 32))).shape == (1, 3, 32, 32)
    with pytest.raises(convert.CheckpointError, match="expected tensor '0.weight' for conv0"):
        convert.adain_vgg_encoder(tmp_path / "decoder.pth", 4)


def test_every_published_cd_file_loads(shared_dir: Path):
    models = shared_dir / "models"
    for k in range(1, 6):
        for folder, enc_name, dec_name in [("cd-wct-16x", f"{k}SE.pth", f"{k}SD.pth"),
                                           ("cd-16x-pruned-base", f"e{k}_base.pth", f"d{k}_base.pth")]:  # fmt: skip
            enc = convert.cd_encoder(models / folder / enc_name, k, aux=True)
            dec = convert.cd_decoder(models / folder / dec_name, k)
            assert enc.out_channels == dec.in_channels == ARCHS["cd16x"].feature_channels(k)
            assert all(torch.isfinite(p).all() for p in (*enc.parameters(), *dec.parameters()))


def test_published_files_holding_cuda_tensors_load_onto_the_cpu(cd16x_dir: Path):
    # Some CD files were saved from a GPU; the converters always map them to the CPU.
    for f in sorted(cd16x_dir.glob("*.pth")):
        assert all(t.device.type == "cpu" for t in convert.read_state_dict(f).values()), f
    if not torch.cuda.is_available():  # show that map_location matters: plain torch.load fails on some
        failing = []
        for f in sorted(cd16x_dir.glob("*.pth")):
            try:
                torch.load(f, weights_only=True)
            except RuntimeError as exc:
                failing.append("CUDA" in str(exc))
        assert failing and all(failing)
