"""Calibration data: tiles drawn from a folder of real images, as rewindable feed dicts.

A stage network's activation ranges depend on what it sees, so calibration
feeds each network what the tiled pipeline will feed it: encoders get image
tiles; the decoders with the fused transform (``decoder_affineK``) get the
encoder's features of a tile together with a WCT map (A, b) fitted from that
tile's statistics and a *different* image's (so the transformed features have
another image's colours, as in stylization). One tile comes from each of the
first ``samples`` readable files (sorted by name), more from files drawn with a
seeded generator where there are fewer, each crop placed by that generator: a
fixed folder, seed and count always give the same samples, and calibration is
deterministic. `probe_tiles` are held-out inputs of a fixed, photo-like noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ultrastyle.calibration.constants import DEFAULT_IMAGE_SIZE, DEFAULT_SAMPLES, DEFAULT_TILE
from ultrastyle.core.padding import pad_to_grid
from ultrastyle.core.transforms import FeatureStats, fit_affine
from ultrastyle.io.images import IMAGE_SUFFIXES, ImageError, array_to_tensor, read_image, resize_long_side
from ultrastyle.io.paths import expand_inputs
from ultrastyle.models.defaults import DEFAULT_ALPHA

Feed = dict[str, np.ndarray]


class CalibrationDataError(ValueError):
    """No usable calibration images: says which folder or file and why."""


def calibration_images(folder: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The folder's image files, sorted, or the files given as a list, in their order; an empty or missing folder, or an
    empty list, is an error (`CalibrationDataError`)."""
    if not isinstance(folder, (str, os.PathLike)):
        files = [Path(f).expanduser() for f in folder]
        if not files:
            raise CalibrationDataError("no calibration images given; give a folder of photos like the ones you will stylize, "
                                       "or a list of image files")  # fmt: skip
        return files
    path = Path(folder).expanduser()  # as a shell would
    if path.is_file():
        raise CalibrationDataError(f"{path}: a file; calibration images are a folder of images: give the folder that holds it")
    if not path.is_dir():
        raise CalibrationDataError(f"{path}: calibration images must be a folder of images; no such folder")
    files = expand_inputs([path])
    if not files:
        raise CalibrationDataError(
            f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) to calibrate on; "
            "give a folder of photos like the ones you will stylize"
        )
    return files


# Calibration images enlarged more than this to image_size warn: 64 px thumbnails enlarged 16x gave 16 dB int8 outputs
# where the same photos whole gave 23-26 dB (a user review, 3 pairs at 384 px).
MAX_ENLARGEMENT = 2


@dataclass(frozen=True)
class TileSampler:
    """``samples`` tiles of ``tile`` x ``tile`` px from ``files``: one from each of the first ``samples`` readable files
    (in the order given: sorted by name from a folder), more from files drawn with a ``seed``-ed generator where there
    are fewer files than tiles; each crop's place is drawn with that generator too.

    Unreadable files are skipped with a note through ``warn``; if none is
    readable the sampler raises `CalibrationDataError` naming the first cause.
    """

    files: tuple[Path, ...]
    tile: int = DEFAULT_TILE
    samples: int = DEFAULT_SAMPLES
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0

    def read(self, warn: Callable[[str], None] | None = None, *, limit: int | None = None) -> list[tuple[Path, torch.Tensor]]:
        """The readable files and their images as (3, H, W) float32, long side ``image_size``: the first ``limit``
        readable ones (None: all; the tiles need ``samples``, and decoding the rest cost gigabytes for nothing)."""
        out, errors, enlarged = [], [], []
        for f in self.files:
            if limit is not None and len(out) >= limit:
                break
            try:
                image = array_to_tensor(read_image(f))
            except (ImageError, OSError) as exc:
                said = str(exc) if isinstance(exc, ImageError) else f"{f}: {exc}"  # an ImageError names its file
                errors.append(said)
                if warn:
                    warn(f"skipping {said}")
                continue
            if max(image.shape[-2:]) * MAX_ENLARGEMENT < self.image_size:
                enlarged.append((max(image.shape[-2:]), f))
            out.append((f, resize_long_side(image, self.image_size)))
        if not out:
            raise CalibrationDataError(f"none of the {len(self.files)} calibration images could be read; first: {errors[0]}")
        if enlarged and warn:
            side, f = min(enlarged)
            warn(f"{len(enlarged)} of {len(out)} calibration images are enlarged more than {MAX_ENLARGEMENT}x to {self.image_size} px "
                 f"(the smallest, {f}, {self.image_size / side:.0f}x): ranges measured on blurred images fit photos poorly (16 dB "
                 f"where photos gave 25); give photos of at least {self.image_size // MAX_ENLARGEMENT} px, or a smaller image size")
        return out

    def images(self, warn: Callable[[str], None] | None = None) -> list[torch.Tensor]:
        """The readable images as (3, H, W) float32, long side ``image_size``."""
        return [image for _, image in self.read(warn)]

    def tiles(self, warn: Callable[[str], None] | None = None) -> list[tuple[torch.Tensor, int]]:
        """[(tile (1, 3, t, t), index of its image)]: deterministic for the files, seed and counts."""
        return self.tiles_of([image for _, image in self.read(warn, limit=self.samples)])

    def tiles_of(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """`tiles` of images already read (`read`): ``tile`` px, or all as small as the smallest image's short side
        (ONNX Runtime's calibrators stack every feed's outputs: tiles of two sizes failed as an "inhomogeneous shape")."""
        gen = np.random.default_rng(self.seed)
        t = min(self.tile, *(min(img.shape[-2:]) for img in images))
        out = []
        for i in range(self.samples):
            j = i % len(images) if i < len(images) else int(gen.integers(len(images)))
            img = images[j]
            _, h, w = img.shape
            r, c = int(gen.integers(h - t + 1)), int(gen.integers(w - t + 1))
            out.append((img[None, :, r : r + t, c : c + t].contiguous(), j))
        return out


class FeedReader:
    """A rewindable iterable of feed dicts (ONNX Runtime's `CalibrationDataReader` protocol).

    ``get_next()`` returns the next feed or None; ``rewind()`` starts over.
    """

    def __init__(self, feeds: list[Feed]) -> None:
        if not feeds:
            raise CalibrationDataError("no calibration feeds: expected at least one tile from the calibration images")
        self.feeds = feeds
        self._it: Iterator[Feed] = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __iter__(self) -> Iterator[Feed]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def probe_tiles(size: int = 128) -> list[tuple[torch.Tensor, int]]:
    """Two fixed (1, 3, size, size) tiles of photo-like noise (a 1/f spectrum, as natural images have; seeded), as two
    images: held-out inputs on which a calibration's int8 graphs are compared with float32 (`quantize.probe_snr`)."""
    out = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        f = np.fft.fftfreq(size)
        falloff = 1 / np.maximum(np.hypot(*np.meshgrid(f, f)), 1 / size)
        spectrum = np.fft.fft2(rng.standard_normal((3, size, size))) * falloff
        x = np.fft.ifft2(spectrum).real
        x = (x - x.min(axis=(1, 2), keepdims=True)) / np.ptp(x, axis=(1, 2), keepdims=True)
        out.append((torch.from_numpy(x.astype(np.float32))[None], seed))
    return out


def stage_feeds(
    encode: Callable[[int, torch.Tensor], torch.Tensor],
    stage: int,
    grid: int,
    tiles: list[tuple[torch.Tensor, int]],
    *,
    method: str = "wct",
    alpha: float = DEFAULT_ALPHA,
) -> dict[str, list[Feed]]:
    """Feeds for ``encoderK`` and ``decoder_affineK`` of one stage.

    ``encode(stage, x)`` is the float32 reference encoder (any runner's
    ``encode``). Tile i is transformed towards the statistics of the next tile
    that comes from another image (itself when all come from one image).
    """
    xs = [pad_to_grid(t, grid) for t, _ in tiles]
    feats = [encode(stage, x).float() for x in xs]
    stats = [FeatureStats.of(f) for f in feats]
    enc, dec = [], []
    for i, (x, f) in enumerate(zip(xs, feats)):
        j = next((m % len(tiles) for m in range(i + 1, i + len(tiles)) if tiles[m % len(tiles)][1] != tiles[i][1]), i)
        a, b = fit_affine(method, stats[i], stats[j], alpha)
        enc.append({"image": x.numpy()})
        dec.append({"features": f.numpy(), "A": a.float().numpy(), "b": b.float().numpy()})
    return {f"encoder{stage}": enc, f"decoder_affine{stage}": dec}
