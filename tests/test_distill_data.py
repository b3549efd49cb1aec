"""Training data: seeded crops, resumable streams, the train/validation split, bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ultrastyle.distill.data import (
    BadImageWarning,
    CenterCrops,
    CropSettings,
    CropStream,
    DataError,
    PairStream,
    list_images,
    readable_images,
    split_files,
    step_loader,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(folder: Path, n: int = 5, size: tuple[int, int] = (72, 48)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_same_seed_same_crops_other_seed_other_crops(tmp_path):
    files = _photos(tmp_path)
    s = CropSettings(crop=32, resize=40)
    a, b, c = CropStream(files, s, seed=3), CropStream(files, s, seed=3), CropStream(files, s, seed=4)
    for g in range(12):
        x = a[g]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, b[g])
    assert any(not torch.equal(a[g], c[g]) for g in range(12))


def test_every_image_once_per_epoch(tmp_path):
    files = _photos(tmp_path, n=4)
    # Crops as high as the (72 x 48) images: each sample is a window of one whole file.
    stream = CropStream(files, CropSettings(crop=48, resize=48, flip=False), seed=0)
    whole = [torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files]
    for epoch in range(2):
        seen = []
        for g in range(epoch * 4, epoch * 4 + 4):
            x = (stream[g] * 255).round().to(torch.uint8)
            seen.append(next(i for i, w in enumerate(whole) if any(torch.equal(x, w[:, :, o : o + 48]) for o in range(25))))
        assert sorted(seen) == [0, 1, 2, 3]


def test_loader_resumed_mid_stream_gives_the_same_batches_with_or_without_workers(tmp_path):
    files = _photos(tmp_path)
    stream = PairStream(CropStream(files, CropSettings(crop=16, resize=24), seed=1))
    full = [b["content"] for b in step_loader(stream, 2, 0, 5, workers=0)]
    tail = [b["content"] for b in step_loader(stream, 2, 3, 5, workers=1)]
    assert len(full) == 5 and len(tail) == 2
    assert all(torch.equal(x, y) for x, y in zip(full[3:], tail))


def test_split_is_disjoint_complete_and_stable_when_files_are_added(tmp_path):
    files = [tmp_path / f"photo{i:03d}.jpg" for i in range(200)]
    train, val = split_files(files, 0.1)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert 5 <= len(val) <= 40
    train2, val2 = split_files(files + [tmp_path / "new.jpg"], 0.1)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert split_files(files[:1], 0.99)[0] == files[:1]  # never an empty training side


def test_empty_or_missing_folder_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty: no images found"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        list_images(tmp_path / "missing")


def test_hidden_files_and_folders_are_not_training_images(tmp_path):
    for name in ("a.png", "sub/b.jpg", "._a.png", ".ipynb_checkpoints/a.png", "sub/.thumbs/c.png", ".hidden.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list_images(tmp_path) == [tmp_path / "a.png", tmp_path / "sub/b.jpg"]
    assert list_images(tmp_path / "sub" / ".thumbs") == [tmp_path / "sub/.thumbs/c.png"]  # a hidden folder given is searched


def test_unreadable_file_is_skipped_with_a_warning_naming_it(tmp_path):
    files = _photos(tmp_path, n=2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is no jpeg")
    with pytest.warns(BadImageWarning, match=r"broken\.jpg: skipped"):
        good = readable_images(list_images(tmp_path))
    assert good == sorted(files)


def test_corrupt_pixel_data_is_replaced_by_another_image_not_a_crash(tmp_path):
    files = _photos(tmp_path, n=3)
    truncated = tmp_path / "truncated.png"
    data = files[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # the header reads fine, the pixels do not
    assert truncated in readable_images([truncated])
    stream = CropStream([truncated, *files], CropSettings(crop=16, resize=24), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crops = [stream[g] for g in range(8)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert any("truncated.png" in str(w.message) for w in caught)


def test_center_crops_are_deterministic_and_pair_styles(tmp_path):
    files = _photos(tmp_path / "c", n=3)
    styles = _photos(tmp_path / "s", n=1, size=(40, 40))
    val = CenterCrops(files, CropSettings(crop=24, resize=32), styles)
    assert len(val) == 3
    item = val[1]
    assert item["content"].shape == (3, 24, 24) and item["style"].shape == (3, 24, 24)
    assert torch.equal(item["content"], CenterCrops(files, CropSettings(crop=24, resize=32))[1]["content"])
