"""What an output keeps of its content file's metadata: the resolution and the EXIF.

A stylized photo is still the photo: its resolution (DPI: the size it prints
at) and its EXIF (camera, date, author, copyright) go into the output, as a
photo editor's "save as" keeps them.

- The resolution is scaled with the resize (``content_size``), so the output
  prints at the content's size.
- The EXIF's orientation becomes 1: the pixels are turned already.
- Its pixel dimensions become the output's.
- Its resolution tags become the output's; its colour space sRGB.
- Of its first directory only the descriptive tags are kept (`KEPT_IFD0`):
  a TIFF content's layout, colour profile and XMP are not the output's.
- Its thumbnail, which would show the unstylized photo, is left out (Pillow
  writes IFD0 and its sub-IFDs only); so is a maker note that would make it
  too long for a JPEG (64 KiB).
- GPS position is left out unless asked for (``"all"``): a stylized image is
  shared more widely than the photo.

Written into PNG (``pHYs`` and ``eXIf`` chunks), JPEG (JFIF density and an
APP1 segment), and TIFF (the resolution tags; TIFF outputs get no EXIF).
Deep Zoom tiles carry none. Only files give metadata: in-memory contents
(arrays, PIL images) have none. Metadata never fails an output: what cannot be
read is left out.
`io.sources.content_meta` reads them from a content file; this module only
holds and writes them (it imports nothing of the package).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

METADATA = ("keep", "all", "none")  # keep: resolution and EXIF without GPS; all: with GPS; none: nothing
ORIENTATION, EXIF_IFD, GPS_IFD = 0x0112, 0x8769, 0x8825
X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 0x011A, 0x011B, 0x0128  # IFD0's resolution (libvips prefers it to JFIF's)
PIXEL_X, PIXEL_Y = 0xA002, 0xA003  # the EXIF IFD's image width and height
MAKER_NOTE = 0x927C  # the camera maker's private block: left out where the EXIF would not fit a JPEG segment
COLOR_SPACE = 0xA001  # the EXIF IFD's colour space: 1, sRGB (what outputs are)
# An APP1 segment's payload, less the ~150 bytes libvips adds when it writes the block again (it drops longer ones).
JPEG_EXIF_MAX = 65533 - 2 - 512
# IFD0 tags an output keeps: who made it, when, with what; and the pointers to the EXIF and GPS blocks. A TIFF
# content's IFD0 is its whole first directory (strip offsets, bits per sample, its ICC profile, XMP): none of that.
KEPT_IFD0 = (0x010E, 0x010F, 0x0110, 0x0131, 0x0132, 0x013B, 0x8298)  # description, make, model, software, date, artist, ©
TURNED = (5, 6, 7, 8)  # orientations whose stored rows are the displayed columns
_INCH = 0.0254  # metres


@dataclass(frozen=True)
class OutputMeta:
    """An output's metadata: ``dpi`` (x, y) or None, and ``exif`` as Pillow writes it (``b"Exif\\0\\0"`` + a TIFF
    structure) or None."""

    dpi: tuple[float, float] | None = None
    exif: bytes | None = None

    def png_chunks(self) -> bytes:
        """``pHYs`` (pixels per metre) and ``eXIf`` chunks, for right after IHDR."""
        out = b""
        if self.dpi is not None:
            x, y = (max(1, round(d / _INCH)) for d in self.dpi)
            out += png_chunk(b"pHYs", struct.pack(">IIB", x, y, 1))
        if self.exif is not None:
            out += png_chunk(b"eXIf", self.exif[6:] if self.exif.startswith(b"Exif\0\0") else self.exif)
        return out

    def into_png(self, data: bytes) -> bytes:
        """An encoded PNG with `png_chunks` after its IHDR (8 bytes of signature, 25 of IHDR)."""
        return data[:33] + self.png_chunks() + data[33:]

    def pil_jpeg(self) -> dict[str, Any]:
        """Pillow's JPEG save keywords."""
        return {**({"dpi": self.dpi} if self.dpi else {}), **({"exif": self.exif} if self.exif else {})}

    def tiff_tags(self) -> dict[str, Any]:
        """tifffile's ``write`` keywords (the resolution; TIFF outputs get no EXIF)."""
        return {"resolution": self.dpi, "resolutionunit": "INCH"} if self.dpi else {}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC (the band writer's too, `io.pyramid`)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
