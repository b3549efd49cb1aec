"""Loss logs: a CSV file (one row per logged step) and a PNG plot of the curves.

Columns: ``step, split, seconds, lr`` then the loss names (``loss`` first).
``split`` is ``train`` (the mean over the steps since the previous train row)
or ``val``. The plot uses matplotlib when it is installed and draws with PIL
otherwise, so matplotlib is never required.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path

from ultrastyle.io.atomic import atomic_path, write_atomic

FIXED = ["step", "split", "seconds", "lr"]


class LossLog:
    """Append-only CSV of loss rows; `truncate` drops rows past a checkpoint on resume."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), None)

    def append(self, step: int, split: str, seconds: float, lr: float, losses: Mapping[str, float]) -> None:
        if self.columns is None:
            names = sorted(losses, key=lambda n: (n != "loss", n))
            self.columns = FIXED + names
            with open(self.path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.columns)
        row = {"step": step, "split": split, "seconds": f"{seconds:.3f}", "lr": f"{lr:.3g}"}
        row.update({k: f"{v:.6g}" for k, v in losses.items()})
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def truncate(self, step: int) -> None:
        """Keep only rows of steps ``<= step`` (what the checkpoint being resumed had seen)."""
        if self.columns is None:
            return
        kept = [r for r in self.rows() if int(r["step"]) <= step]
        text = io.StringIO(newline="")
        writer = csv.writer(text)  # as `append` writes rows: one quoting and line ending in the whole file
        writer.writerow(self.columns)
        writer.writerows([r.get(c, "") or "" for c in self.columns] for r in kept)
        write_atomic(self.path, text.getvalue())


def is_loss_log(path: str | Path) -> bool:
    """Whether ``path`` is a log `LossLog` wrote (its fixed columns first), or empty; not text, or other columns: someone's file."""
    try:
        columns = LossLog(path).columns
    except (UnicodeDecodeError, csv.Error):
        return False
    return columns is None or columns[: len(FIXED)] == FIXED


def _series(rows: list[dict[str, str]], name: str, split: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(name) or ""
        if r["split"] == split and v:
            y = float(v)
            if math.isfinite(y) and y > 0:
                xs.append(float(r["step"]))
                ys.append(y)
    return xs, ys


def plot_losses(csv_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Draw every loss column of ``csv_path`` (log scale, train line, val dots) into ``png_path``."""
    rows = LossLog(csv_path).rows()
    if not rows:
        return None
    names = [c for c in rows[0] if c not in FIXED]
    png_path = Path(png_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    with atomic_path(png_path) as tmp:  # the temp name has no .png: formats are given explicitly
        if plt is None:
            _plot_pil(rows, names, tmp, title)
        else:
            fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
            for ax, name in zip(axes[0], names):
                for split, style in (("train", "-"), ("val", "o")):
                    xs, ys = _series(rows, name, split)
                    if xs:
                        ax.plot(xs, ys, style, label=split, markersize=3)
                ax.set_yscale("log")
                ax.set_title(name)
                ax.set_xlabel("step")
            axes[0][0].legend()
            fig.suptitle(title)
            fig.tight_layout()
            try:
                fig.savefig(tmp, dpi=80, format="png")
            finally:
                plt.close(fig)
    return png_path


def _plot_pil(rows: list[dict[str, str]], names: list[str], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    pw, ph, margin = 260, 200, 34
    img = Image.new("RGB", (pw * len(names), ph + 20), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), title, fill="black")
    for i, name in enumerate(names):
        x0, y0, x1, y1 = i * pw + margin, 20 + 16, (i + 1) * pw - 8, 20 + ph - 18
        draw.rectangle((x0, y0, x1, y1), outline="grey")
        draw.text((x0, y0 - 14), f"{name} (log)", fill="black")
        series = {s: _series(rows, name, s) for s in ("train", "val")}
        xs = [x for s in series.values() for x in s[0]]
        ys = [math.log10(y) for s in series.values() for y in s[1]]
        if not xs:
            continue
        xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ymin, ymax = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def at(x: float, y: float) -> tuple[float, float]:
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0), y1 - (math.log10(y) - ymin) / (ymax - ymin) * (y1 - y0))

        draw.text((x0 - margin + 2, y0), f"{10**ymax:.2g}", fill="black")
        draw.text((x0 - margin + 2, y1 - 10), f"{10**ymin:.2g}", fill="black")
        draw.text((x0, y1 + 3), f"{xmin:.0f}", fill="black")
        draw.text((x1 - 30, y1 + 3), f"{xmax:.0f}", fill="black")
        tx, ty = series["train"]
        if len(tx) > 1:
            draw.line([at(x, y) for x, y in zip(tx, ty)], fill=(31, 119, 180), width=2)
        for x, y in zip(*series["val"]):
            px, py = at(x, y)
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(255, 127, 14))
    img.save(path, format="PNG")
