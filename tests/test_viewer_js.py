"""The Deep Zoom viewer page's JavaScript, run in Node with a stub DOM: tiles requested as they come into view.

No browser here (the issue's Chromium screenshot test remains to do); this runs the page's
own script against a fake canvas, fake images and fake events, and checks which tiles it asks for.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ultrastyle.io.pyramid import DZI_TILE, dzi_levels, viewer_html

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="runs the Deep Zoom viewer's JavaScript in Node.js, which is not on PATH here (install nodejs)")

HARNESS = r"""
const fs = require("fs");
const src = fs.readFileSync(process.argv[2], "utf8");
const requested = [], draws = [], pending = [], listeners = {};
let raf = [];
const ctx = {
  setTransform() {}, clearRect() {}, save() {}, restore() {}, beginPath() {}, rect() {}, clip() {},
  drawImage(img) { draws.push(img.src); },
};
const canvas = {
  clientWidth: 800, clientHeight: 600, width: 0, height: 0, getContext: () => ctx,
  addEventListener: (t, f) => { listeners[t] = f; }, setPointerCapture() {}, classList: { add() {}, remove() {} },
};
const others = {};
global.document = { getElementById: (id) => id === "view" ? canvas : (others[id] = others[id] || { textContent: "" }) };
global.window = { devicePixelRatio: 1, addEventListener: (t, f) => { listeners["window:" + t] = f; } };
global.requestAnimationFrame = (f) => raf.push(f);
global.Image = class {
  set src(v) { this._src = v; requested.push(v); pending.push(this); this.naturalWidth = this.naturalHeight = 256; }
  get src() { return this._src; }
};
eval(src);
function flush() { while (raf.length) { const q = raf; raf = []; q.forEach((f) => f()); } }
function settle() { flush(); while (pending.length) { pending.splice(0).forEach((i) => i.onload()); flush(); } }
const phases = [];
function phase(name) { phases.push({ name, requested: requested.splice(0), draws: draws.splice(0), info: others.info.textContent }); }
settle(); phase("open");
for (let i = 0; i < 6; i++) listeners.wheel({ preventDefault() {}, deltaY: -350, deltaMode: 0, offsetX: 400, offsetY: 300 });
settle(); phase("wheel");
listeners.pointerdown({ pointerId: 1, offsetX: 400, offsetY: 300 });
for (let x = 400; x >= -2800; x -= 800) listeners.pointermove({ pointerId: 1, offsetX: x, offsetY: 300 });
listeners.pointerup({ pointerId: 1 });
settle(); phase("drag");
for (let i = 0; i < 5; i++) others["zoom-out"].onclick();
settle(); phase("buttons");
console.log(JSON.stringify(phases));
"""


def _exists(url: str, name: str, h: int, w: int) -> tuple[int, int, int]:
    m = re.fullmatch(rf"{re.escape(name)}_files/(\d+)/(\d+)_(\d+)\.jpg", url)
    assert m, url
    level, c, r = map(int, m.groups())
    lh, lw = dzi_levels(h, w)[level]
    assert c < math.ceil(lw / DZI_TILE) and r < math.ceil(lh / DZI_TILE), url  # a tile the writer makes
    return level, c, r


def test_the_viewer_loads_the_tiles_in_view(tmp_path: Path) -> None:
    h, w = 3000, 5000
    page = viewer_html("pic", h, w, "jpg")
    (tmp_path / "view.js").write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    (tmp_path / "harness.js").write_text(HARNESS)
    r = subprocess.run([NODE, str(tmp_path / "harness.js"), str(tmp_path / "view.js")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    phases = {p["name"]: p for p in json.loads(r.stdout)}
    top = len(dzi_levels(h, w)) - 1  # 13

    opened = [_exists(u, "pic", h, w) for u in phases["open"]["requested"]]
    assert {lv for lv, _, _ in opened} == {8, 11}  # the base level (one tile) and the fitted view: 0.16 x -> 1/4 scale
    assert phases["open"]["draws"] and "%" in phases["open"]["info"]

    zoomed = [_exists(u, "pic", h, w) for u in phases["wheel"]["requested"]]
    assert {lv for lv, _, _ in zoomed} == {top}  # 6 notches of 2x: past 1:1, the full level
    assert 0 < len(zoomed) <= (800 // DZI_TILE + 2) * (600 // DZI_TILE + 2)  # only what is on screen
    assert any(f"/{top}/" in d for d in phases["wheel"]["draws"])

    dragged = [_exists(u, "pic", h, w) for u in phases["drag"]["requested"]]
    assert dragged and set(dragged).isdisjoint(zoomed)  # new tiles came into view from the right
    assert min(c for _, c, _ in dragged) > min(c for _, c, _ in zoomed)

    out = [_exists(u, "pic", h, w) for u in phases["buttons"]["requested"]]
    assert out and all(lv == top - 1 for lv, _, _ in out)  # 1/32 of ~10.7 x: the half-size level


def test_a_tiny_image_is_fitted_large_and_zoom_in_zooms_in(tmp_path: Path) -> None:
    page = viewer_html("dot", 2, 3, "png")  # fitted to 800 x 600: 26667%, above the 1600% a large image may reach
    steps = 'settle(); phase("open"); others["zoom-in"].onclick(); settle(); phase("in"); console.log(JSON.stringify(phases));'
    (tmp_path / "view.js").write_text(re.search(r"<script>(.*)</script>", page, re.S).group(1))
    (tmp_path / "harness.js").write_text(HARNESS[: HARNESS.index('settle(); phase("open");')] + steps)
    r = subprocess.run([NODE, str(tmp_path / "harness.js"), str(tmp_path / "view.js")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shown = {p["name"]: p["info"] for p in json.loads(r.stdout)}
    percent = {k: re.match(r"(\d+(?:\.\d+)?)%", v) for k, v in shown.items()}
    assert all(percent.values()), shown  # a plain number, not "2.67e+4%"
    assert float(percent["open"].group(1)) == pytest.approx(800 / 3 * 100, abs=1)
    assert float(percent["in"].group(1)) == pytest.approx(2 * 800 / 3 * 100, abs=1), shown  # in, not out to the 1600% cap
