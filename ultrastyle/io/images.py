"""Reading and writing images as float tensors, with one clear error per bad file.

Images are (3, H, W) float32 RGB in [0, 1]. Outputs are written to a temporary
file beside the target and renamed, so no partial file is ever left.
"""

from __future__ import annotations

import os
import secrets
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}
FORMATS = {"png": "PNG", "jpg": "JPEG", "tiff": "TIFF"}
# Ultra-resolution is the point of this toolkit: PIL's decompression-bomb guard
# (89 MP) is raised deliberately, to this default, and can be set per call.
DEFAULT_MAX_PIXELS = 400_000_000


class ImageError(ValueError):
    """A file that cannot be read or written as an image; the message names file and cause."""


@contextmanager
def _bomb_guard(max_pixels: int):
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Read ``path`` as (3, H, W) float32 RGB in [0, 1].

    EXIF orientation is applied; grey, palette and CMYK images become RGB;
    transparency is composited over white; 16-bit grey keeps its precision.
    Raises `ImageError` naming the file and the cause.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with _bomb_guard(max_pixels), Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{path}: {w}x{h} = {w * h / 1e6:.0f} MP is above the limit of {max_pixels / 1e6:.0f} MP (raise --max-pixels to allow it)")
            if w == 0 or h == 0:
                raise ImageError(f"{path}: zero-size image ({w}x{h})")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_tensor(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: image is larger than the limit of {max_pixels / 1e6:.0f} MP (raise --max-pixels to allow it): {exc}") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: cannot read the file (permission denied)") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{path}: not an image file PIL can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: truncated or corrupt image data ({exc})") from exc


def _to_tensor(img: Image.Image) -> torch.Tensor:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey (PNG/TIFF): keep the precision instead of going through 8 bits.
        a = np.asarray(img, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(a, 0, 1)).expand(3, *a.shape).contiguous()
    if mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return torch.from_numpy(a).expand(3, *a.shape).contiguous()
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def resize_long_side(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (3, H, W) so its long side is ``size`` (antialiased bicubic); 0 keeps it."""
    h, w = img.shape[-2:]
    if size <= 0 or max(h, w) == size:
        return img
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def save_image(img: torch.Tensor, path: str | Path, fmt: str = "png") -> Path:
    """Write (3, H, W) in [0, 1] (clamped) atomically: temp file in the same folder, then rename."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ImageError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    a = (img.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(a, "RGB")
    # Not mkstemp: its 0600 mode would survive the rename; "xb" honours the umask.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "xb")  # noqa: SIM115 - closed below, removed on any failure
    except OSError as exc:
        raise ImageError(f"{path.parent}: cannot write to the output directory ({exc.strerror or exc})") from exc
    try:
        with f:
            kwargs = {"quality": 95} if fmt == "jpg" else {}
            pil.save(f, FORMATS[fmt], **kwargs)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ImageError(f"{path}: cannot write the image ({exc.strerror or exc})") from exc
        raise
    return path
