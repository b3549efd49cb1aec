"""Label images for spatial control (`stylize --mask`): one region per distinct colour."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image

from ultrastyle.io.images import DEFAULT_MAX_PIXELS, ImageError, read_image
from ultrastyle.io.paths import file_signature
from ultrastyle.io.sources import Source, image_header

MAX_LABELS = 255

# `keep_labels`'s store while one is open in this thread (a context variable: other threads' reads are not kept).
_kept: ContextVar[dict[tuple, tuple[np.ndarray, list[tuple[int, ...]]]] | None] = ContextVar("ultrastyle_kept_labels", default=None)


@contextmanager
def keep_labels() -> Iterator[None]:
    """Within it, `read_labels` decodes each version of a mask file once: a front end's early check, then its batch's read.

    Outside, nothing is kept: a gigapixel mask's labels are a gigabyte. Measured: a 25 MP two-colour PNG mask takes 2.2 s
    to read (0.09 s/MP, as much as stylizing it on a GPU). Per thread (and asyncio task); nested, the outer store is used.
    """
    token = _kept.set(_kept.get() if _kept.get() is not None else {})
    try:
        yield
    finally:
        _kept.reset(token)


def read_labels(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """A mask file as (labels (H, W) uint8, the colour of each label).

    Every distinct colour (grey level for grey images) is one label; labels are
    numbered in ascending order of colour, so label ``i`` takes the ``i``-th
    style. Raises `ImageError` naming the file for unreadable images and for
    images with more than `MAX_LABELS` colours (a photo or a JPEG, whose
    compression noise makes every pixel a label). Transparent pixels (a mask
    painted on a transparent layer) are one label, colour (0, 0, 0, 0): the first.
    Within `keep_labels`, a file read before is not decoded again.
    """
    kept, key = _kept.get(), (Path(path).resolve(), file_signature(path), max_pixels)
    if kept is not None and key in kept:
        return kept[key]
    found = labels_of(read_image(path, max_pixels=max_pixels, keep_alpha=True), str(path))
    if kept is not None and key[1] is not None:
        kept[key] = found
    return found


# Pixels per band when labelling: the sort's temporaries (8 bytes a pixel, twice) stay a few MB beside the mask.
LABEL_BAND_PIXELS = 1 << 20


def labels_of(a: np.ndarray, name: str = "mask") -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """`read_labels` of decoded pixels (H, W, 3), (H, W, 4) RGBA or (H, W); ``name`` names them in errors.

    Float samples (in [0, 1]) are read as 16-bit values, so that colours are whole numbers in ascending order.
    Labelled a band of rows at a time: beside the pixels, a byte per pixel for the labels and a band's temporaries
    (measured before: 474 MiB for a 16 MP grey mask, its sort and inverse in int64 over the whole image).
    """
    if a.dtype.kind == "f":
        a = np.round(np.clip(a, 0, 1) * 65535).astype(np.uint16)
    if a.ndim == 2:
        a = a[..., None]
    h, w = a.shape[:2]
    step = max(1, LABEL_BAND_PIXELS // max(w, 1))
    bands = [slice(r, min(h, r + step)) for r in range(0, h, step)]
    if a.shape[-1] == 4 and all((a[b, :, 3] == np.iinfo(a.dtype).max).all() for b in bands):
        a = a[..., :3]  # opaque: the colours alone
    if a.shape[-1] == 3 and all(np.array_equal(a[b, :, 0], a[b, :, 1]) and np.array_equal(a[b, :, 0], a[b, :, 2]) for b in bands):
        a = a[..., :1]  # grey: one value per label
    # Channels packed into one unsigned 64-bit number (at most 4 x 16 bits): sorted, they are the colours in ascending order.
    shift, channels = 8 * a.itemsize, a.shape[-1]

    def packed(rows: slice) -> np.ndarray:
        if channels == 1:
            return a[rows, :, 0]
        out = np.zeros((rows.stop - rows.start, w), np.uint64)
        for c in range(channels):
            out = (out << np.uint64(shift)) | a[rows, :, c].astype(np.uint64)
        return out

    values = np.unique(np.concatenate([np.unique(packed(b)) for b in bands]))
    if len(values) > MAX_LABELS:
        raise ImageError(
            f"{name}: {len(values)} distinct colours; a mask is a label image with one flat colour per region "
            f"(at most {MAX_LABELS}), e.g. a PNG painted without antialiasing (not a JPEG)"
        )
    labels = np.empty((h, w), np.uint8)
    for b in bands:
        labels[b] = np.searchsorted(values, packed(b))
    m = (1 << shift) - 1
    colours = [tuple((int(v) >> (shift * (channels - 1 - c))) & m for c in range(channels)) for v in values]
    return labels, colours


def check_mask_size(mask: Source, contents: Iterable[Source]) -> None:
    """Refuse, from headers alone, a mask whose size is that of none of ``contents``: `ImageError` naming the mask.

    Before its labels are decoded (a mask is read whole: 12000 x 12000 took 1.7 GB to be told it did not fit a
    small photo). Sizes are compared either way round (an EXIF orientation may turn either); an unreadable header
    refuses nothing (its read reports it).
    """
    header = image_header(mask)
    if header is None:
        return
    sizes = []
    for content in contents:
        size = image_header(content)
        if size is None or sorted(size[:2]) == sorted(header[:2]):
            return
        sizes.append(size)
    if sizes:
        others = " (and no other content is that size)" if len(sizes) > 1 else ""
        raise ImageError(f"{mask}: the mask is {header[0]}x{header[1]} but the content is {sizes[0][0]}x{sizes[0][1]}{others}; "
                         "give a mask of the content's size")


def check_label_count(path: str | Path, colours: list[tuple[int, ...]], styles: int) -> None:
    """`ImageError` naming the mask unless it has exactly one label per style."""
    if len(colours) != styles:
        shown = ", ".join(map(str, colours[:8])) + (", ..." if len(colours) > 8 else "")
        # Many more colours than styles: edges blended by antialiasing or JPEG compression, not regions.
        blended = ""
        if len(colours) > max(8, 2 * styles):
            blended = "; so many colours suggest blended edges: paint the mask without antialiasing and save it as PNG, not JPEG"
        raise ImageError(
            f"{path}: the mask has {len(colours)} label{'s' if len(colours) != 1 else ''} but {styles} style(s) were given "
            f"(colour{'s' if len(colours) != 1 else ''} {shown}); "
            f"give one style per label, in ascending order of colour{blended}"
        )


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (labels never blend)."""
    if labels.shape == (height, width):
        return labels
    return np.asarray(Image.fromarray(labels).resize((width, height), Image.Resampling.NEAREST))
