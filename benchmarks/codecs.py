"""PNG and JPEG encoders for stylized outputs: encode time and file size, side by side.

Encodes one stylized-looking 8-bit RGB image (a real photo run through the
CD 16x cascade at 5 stages, or with ``--photo`` the photo itself) with:

- PIL's PNG at zlib levels 0, 1, 3, 6 (PIL's default) and 9;
- imagecodecs' libpng (``png_encode``) at level 1, plain and with the fast
  settings its docstring gives (RLE strategy, SUB filter: what ultrastyle
  writes at ``--png-level 1``, the default), and at level 6;
- imagecodecs' libspng (``spng_encode``) at level 1;
- PIL's JPEG at quality 95 (what ``--format jpg`` writes).

Each row: the median of ``--repeats`` encodes (after one warm-up), MB/s of raw
pixels, the file size and its ratio to PIL level 6. One thread per encode,
as each writer thread of the batch runs one. ~1 min at 4 MP on 2 cores.

    .venv/bin/python benchmarks/codecs.py                  # 4 MP, stylized
    .venv/bin/python benchmarks/codecs.py --mp 20 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _image(mp: float, photo: bool) -> np.ndarray:
    src = SHARED / "images/large/lomiri_seeding_by_Clements_Engelhardt.jpg"
    with Image.open(src) as im:
        w, h = im.size
        s = (mp * 1e6 / (w * h)) ** 0.5
        a = np.asarray(im.convert("RGB").resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS))
    if photo:
        return a
    import ultrastyle

    style = SHARED / "images/style/cd_style_in1.jpg"
    ultrastyle_home = SHARED / "models/cd-wct-16x"
    return ultrastyle.stylize(a, style, model=ultrastyle_home, max_memory="2GB")


def _encoders() -> dict[str, callable]:
    import imagecodecs

    def pil_png(level: int):
        def enc(a: np.ndarray) -> bytes:
            b = io.BytesIO()
            Image.fromarray(a, "RGB").save(b, "PNG", compress_level=level)
            return b.getvalue()

        return enc

    def pil_jpeg(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        Image.fromarray(a, "RGB").save(b, "JPEG", quality=95)
        return b.getvalue()

    encs = {f"PIL PNG level {lv}": pil_png(lv) for lv in (0, 1, 3, 6, 9)}
    encs["imagecodecs libpng level 1"] = lambda a: imagecodecs.png_encode(a, level=1)
    encs["imagecodecs libpng level 1, RLE, SUB filter (default)"] = lambda a: imagecodecs.png_encode(a, level=1, strategy=3, filter=16)
    encs["imagecodecs libpng level 6"] = lambda a: imagecodecs.png_encode(a, level=6)
    if imagecodecs.SPNG.available:
        encs["imagecodecs libspng level 1"] = lambda a: imagecodecs.spng_encode(a, level=1)
    encs["PIL JPEG quality 95"] = pil_jpeg
    return encs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mp", type=float, default=4.0, help="image size in megapixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--photo", action="store_true", help="encode the photo itself, not a stylized output")
    args = ap.parse_args()
    a = np.ascontiguousarray(_image(args.mp, args.photo))
    print(f"{a.shape[1]}x{a.shape[0]} ({a.shape[0] * a.shape[1] / 1e6:.1f} MP), {'photo' if args.photo else 'stylized'}, "
          f"{args.repeats} repeats")  # fmt: skip
    rows = []
    for name, enc in _encoders().items():
        data = enc(a)
        rows.append((name, median_seconds(lambda: enc(a), args.repeats), len(data)))
    ref = next(size for name, _, size in rows if name == "PIL PNG level 6")
    print("| encoder | median s | MB/s (raw) | size MB | size / PIL level 6 |")
    print("|---|---|---|---|---|")
    for name, t, size in rows:
        print(f"| {name} | {t:.3f} | {a.nbytes / t / 1e6:.0f} | {size / 1e6:.2f} | {size / ref:.2f} |")


if __name__ == "__main__":
    main()
