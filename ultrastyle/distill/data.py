"""Training images: an endless, seeded stream of random crops from an image folder.

Sample ``g`` of the stream (``g = step * batch_size + j``) is fully determined
by ``(seed, g)``: it shows image ``perm_e[g % n]`` of epoch ``e = g // n`` (a
fresh permutation per epoch), cropped at a random position and maybe flipped.
Nothing depends on worker processes or on where a run was resumed, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees.

Bad files: every file's header is read when the dataset is built; a file that
cannot be opened is left out with a warning naming the file and the cause (a
folder with no readable image at all is an error). A file whose pixel data
turns out corrupt later, during training, is replaced for that sample by the
next image of the same permutation, again with a warning, so one bad photo
never stops a multi-hour run.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ultrastyle.errors import warn
from ultrastyle.io.images import IMAGE_SUFFIXES, ImageError, read_image
from ultrastyle.io.paths import is_image_name


class DataError(ValueError):
    """A training folder that cannot be used; the message names the folder or file and the cause."""


class BadImageWarning(UserWarning):
    """A training image that was skipped (unreadable header or corrupt data)."""


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders left out), sorted; `DataError` if there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parent.parts))  # not .git, ._NAME  # fmt: skip
    if not files:
        raise DataError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def readable_images(files: Sequence[Path], min_side: int = 1) -> list[Path]:
    """The files whose header PIL can read, warning once per file left out.

    Only headers are read (cheap); ``min_side`` drops images too small to crop from.
    """
    good = []
    for f in files:
        try:
            with Image.open(f) as img:
                w, h = img.size
        except Exception as exc:  # PIL raises many types for broken files
            why = "an empty file (0 bytes)" if f.stat().st_size == 0 else f"not a readable image ({type(exc).__name__}: {exc})"
            warn(f"{f}: skipped, {why}", BadImageWarning)
            continue
        if min(w, h) < min_side:
            warn(f"{f}: skipped, {w}x{h} is smaller than {min_side} px", BadImageWarning)
            continue
        good.append(f)
    return good


def decodable_from(files: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """``files`` from the first one that decodes whole (those before it, which do not, left out), and why each left out failed.

    A header (`readable_images`) passes a truncated file: a run whose images all failed found out in its data loader,
    after its run folder was written.
    """
    failed = []
    for i, f in enumerate(files):
        try:
            read_image(f)
        except ImageError as exc:
            failed.append(f"{exc}; skipped")
            continue
        return list(files[i:]), failed
    return [], failed


def split_files(files: Sequence[Path], val_fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, validation): a file goes to validation when a hash of its name falls below ``val_fraction``.

    Hashing the name (not a shuffled position) keeps every file on its side of
    the split when photos are added or removed. At least one file stays on the
    training side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")

    def u(p: Path) -> float:
        return int.from_bytes(hashlib.sha1(p.name.encode()).digest()[:8], "big") / 2**64

    val = [f for f in files if u(f) < val_fraction]
    train = [f for f in files if u(f) >= val_fraction]
    if not train:
        train, val = list(val[:1]), list(val[1:])
    return train, val


def _load_resized(path: Path, short_side: int, min_side: int) -> np.ndarray:
    """(3, h, w) uint8 with the short side resized to ``short_side`` (0: as is), at least ``min_side``.

    Resizing runs in PIL on 8 bits (antialiased bicubic): several times faster
    than in float, and training crops need no more precision.
    """
    a = read_image(path)
    if a.dtype != np.uint8:
        peak = 65535.0 if a.dtype == np.uint16 else 1.0
        a = (a.astype(np.float32) * (255.0 / peak) + 0.5).clip(0, 255).astype(np.uint8)
    h, w = a.shape[:2]
    target = max(short_side or min(h, w), min_side)
    if min(h, w) != target:
        scale = target / min(h, w)
        size = (max(target, round(w * scale)), max(target, round(h * scale)))
        a = np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC, reducing_gap=3.0))
    return np.ascontiguousarray(a.transpose(2, 0, 1))


@dataclass(frozen=True)
class CropSettings:
    """How a stream cuts samples: ``crop`` px squares from images whose short side is ``resize`` px (0: native)."""

    crop: int = 256
    resize: int = 300
    flip: bool = True


class CropStream(Dataset):
    """Endless stream of (3, crop, crop) float crops in [0, 1]; item ``g`` depends only on ``(seed, g)``.

    Decoded, resized images are cached per process (uint8; ~0.5 MB per photo
    at a 300 px short side), so each worker decodes each file once.
    """

    def __init__(self, files: Sequence[Path], settings: CropSettings = CropSettings(), seed: int = 0, cache: bool = True) -> None:
        if not files:
            raise DataError("no training images: expected at least one image file")
        self.files = list(files)
        self.settings = settings
        self.seed = seed
        self.cache = cache
        self._images: dict[int, np.ndarray] = {}
        self._perm_epoch = -1
        self._perm = np.arange(0)
        self._warned: set[int] = set()  # files that failed to decode, named once

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.files))
            self._perm_epoch = epoch
        return self._perm

    def _image(self, index: int) -> np.ndarray:
        img = self._images.get(index)
        if img is None:
            s = self.settings
            img = _load_resized(self.files[index], s.resize, s.crop)
            if self.cache:
                self._images[index] = img
        return img

    def __getitem__(self, g: int) -> torch.Tensor:
        n = len(self.files)
        perm = self._permutation(g // n)
        rng = np.random.default_rng([self.seed, 2, g])
        for attempt in range(n):
            index = int(perm[(g + attempt) % n])
            try:
                img = self._image(index)
                break
            except ImageError as exc:
                if index not in self._warned:  # drawn again and again over a run: said once (per loader process)
                    self._warned.add(index)
                    warn(f"{exc}; using another image for each sample that draws it", BadImageWarning)
        else:
            raise DataError(f"none of the {n} training images could be decoded")
        c = self.settings.crop
        _, h, w = img.shape
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        crop = img[:, top : top + c, left : left + c]
        if self.settings.flip and rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(crop)).float().div_(255.0)

    def __len__(self) -> int:  # one epoch; the stream itself is endless (see `StepSampler`)
        return len(self.files)


class PairStream(Dataset):
    """Items ``{"content": crop, "style": crop}`` (AdaIN); ``{"content": crop}`` without styles."""

    def __init__(self, content: CropStream, style: CropStream | None = None) -> None:
        self.content, self.style = content, style

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        item = {"content": self.content[g]}
        if self.style is not None:
            item["style"] = self.style[g]
        return item

    def __len__(self) -> int:
        return len(self.content)


class CenterCrops(Dataset):
    """Validation: one deterministic center crop per file, ``{"content": (3, crop, crop)}``."""

    def __init__(self, files: Sequence[Path], settings: CropSettings = CropSettings(), styles: Sequence[Path] = ()) -> None:
        self.files, self.settings, self.styles = list(files), settings, list(styles)
        self._cache: dict[Path, np.ndarray] = {}

    def _crop(self, path: Path) -> torch.Tensor:
        img = self._cache.get(path)
        if img is None:
            img = self._cache[path] = _load_resized(path, self.settings.resize, self.settings.crop)
        c = self.settings.crop
        _, h, w = img.shape
        top, left = (h - c) // 2, (w - c) // 2
        return torch.from_numpy(np.ascontiguousarray(img[:, top : top + c, left : left + c])).float().div_(255.0)

    def readable(self, warn: Callable[[str], None]) -> CenterCrops | None:
        """This set without the files that do not decode (each named through ``warn``); None if none does.

        Decodes every file once (they are cached for the validations anyway), so a
        corrupt photo in the split is left out here rather than failing a validation.
        """
        good: dict[str, list[Path]] = {"files": [], "styles": []}
        for key in good:
            for f in getattr(self, key):
                try:
                    self._crop(f)
                except ImageError as exc:
                    warn(f"{exc}; left out of validation")
                else:
                    good[key].append(f)
        if not good["files"] or (self.styles and not good["styles"]):
            return None
        self.files, self.styles = good["files"], good["styles"]
        return self

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"content": self._crop(self.files[i])}
        if self.styles:
            item["style"] = self._crop(self.styles[i % len(self.styles)])
        return item

    def __len__(self) -> int:
        return len(self.files)


class StepSampler(Sampler[int]):
    """Stream indices of steps ``[start, stop)``: ``start * batch .. stop * batch - 1``."""

    def __init__(self, start: int, stop: int, batch_size: int) -> None:
        self.first, self.last = start * batch_size, stop * batch_size

    def __iter__(self):
        return iter(range(self.first, self.last))

    def __len__(self) -> int:
        return self.last - self.first


def _worker_init(_: int) -> None:
    # Ctrl-C goes to the whole process group, and so does SIGTERM from systemd or a job scheduler; the main process
    # handles both (checkpoint, then stop, shutting the loader down), so workers must not die half-way through a batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # decoding and resizing: leave the cores to the training step


def step_loader(stream: Dataset, batch_size: int, start: int, stop: int, workers: int = 0) -> DataLoader:
    """Batches of steps ``start..stop-1`` of ``stream``, the same whatever ``workers`` is."""
    return DataLoader(
        stream,
        batch_size=batch_size,
        sampler=StepSampler(start, stop, batch_size),
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
