"""The Deep Zoom viewer page written beside every ``.dzi`` (`io.pyramid.viewer_html` fills in the title and CONFIG).

Our own code, a canvas and a few hundred lines of JavaScript, no third-party
code and no network: pan by dragging, zoom with the wheel, a pinch or the
buttons (keys + - 0 1 and the arrows too), tiles of the level on screen
loaded as they come into view, nearest to the centre first, coarser levels
drawn under them until they arrive. Works from ``file://``: the pyramid's
description is in the page (a ``file://`` page may not fetch the ``.dzi``),
and tiles are loaded as images, which such a page may do.
"""

PAGE = r"""<!DOCTYPE html>
<!-- A Deep Zoom viewer written for ultrastyle (io/pyramid.py fills in the title and CONFIG).
     Self-contained: no network, no third-party code; works from file:// because the pyramid's
     description is in this page and tiles are loaded as images (a file:// page may not fetch files).
     The pyramid itself (the .dzi named in CONFIG.dzi and its _files folder) opens in any Deep Zoom viewer. -->
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  html, body { margin: 0; height: 100%; overflow: hidden; background: #1e1e1e; color: #eee;
               font: 13px system-ui, sans-serif; }
  #view { display: block; width: 100%; height: 100%; touch-action: none; cursor: grab; }
  #view.dragging { cursor: grabbing; }
  #bar { position: fixed; top: 8px; left: 8px; display: flex; gap: 4px; align-items: center; user-select: none; }
  #bar button { width: 34px; height: 34px; border: 0; border-radius: 4px; background: rgba(0, 0, 0, .65);
                color: #fff; font-size: 17px; cursor: pointer; }
  #bar button:hover { background: rgba(60, 60, 60, .9); }
  #bar span { padding: 0 8px; line-height: 34px; border-radius: 4px; background: rgba(0, 0, 0, .65); }
</style>
</head>
<body>
<canvas id="view" aria-label="__TITLE__"></canvas>
<div id="bar">
  <button id="zoom-in" title="Zoom in (+)">+</button>
  <button id="zoom-out" title="Zoom out (-)">&minus;</button>
  <button id="fit" title="Whole image (0)">&#x2922;</button>
  <button id="actual" title="Actual pixels (1)">1:1</button>
  <span id="info"></span>
</div>
<script>
"use strict";
const CONFIG = __CONFIG__;

(function () {
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const info = document.getElementById("info");
  const W = CONFIG.width, H = CONFIG.height, TILE = CONFIG.tileSize, OV = CONFIG.overlap, MAX = CONFIG.maxLevel;
  const MAX_LOADS = 16;      // tiles requested at once: the nearest to the centre first
  const CACHE_TILES = 800;   // decoded tiles kept; the least recently drawn go first

  // Level sizes as the writer makes them: each level is the ceiling of half the next one.
  const sizes = new Array(MAX + 1);
  sizes[MAX] = [W, H];
  for (let l = MAX - 1; l >= 0; l--) sizes[l] = [Math.ceil(sizes[l + 1][0] / 2), Math.ceil(sizes[l + 1][1] / 2)];
  // The coarsest level that still has some detail: loaded first, drawn under everything.
  let BASE = 0;
  while (BASE < MAX && Math.max(sizes[BASE + 1][0], sizes[BASE + 1][1]) <= TILE) BASE++;

  // The view: screen (CSS) pixel (sx, sy) shows image pixel (vx + sx / scale, vy + sy / scale).
  let scale = 1, vx = 0, vy = 0, fitted = true;
  let cssW = 1, cssH = 1, dpr = 1;
  const cache = new Map();   // "level/col_row" -> {img, ok, failed, used}
  let loading = 0, frame = 0, pending = false;

  function minScale() { return Math.min(fitScale(), 1) / 4; }
  function maxScale() { return Math.max(16, 4 * fitScale()); }  // a tiny image is fitted large: zoom goes on from there
  function fitScale() { return Math.min(cssW / W, cssH / H); }

  function fit() {
    scale = fitScale();
    vx = (W - cssW / scale) / 2;
    vy = (H - cssH / scale) / 2;
    fitted = true;
    redraw();
  }

  // Zoom by `factor` keeping the image point under screen point (sx, sy) where it is.
  function zoomAt(factor, sx, sy) {
    const s = Math.min(maxScale(), Math.max(minScale(), scale * factor));
    const ix = vx + sx / scale, iy = vy + sy / scale;
    scale = s;
    vx = ix - sx / scale;
    vy = iy - sy / scale;
    fitted = false;
    redraw();
  }

  function panBy(dx, dy) {
    vx -= dx / scale;
    vy -= dy / scale;
    fitted = false;
    redraw();
  }

  // Keep some of the image on screen: it cannot be dragged out of sight.
  function clampView() {
    const vw = cssW / scale, vh = cssH / scale;
    const mx = Math.min(vw, W) * 0.5, my = Math.min(vh, H) * 0.5;
    vx = Math.min(W - mx, Math.max(mx - vw, vx));
    vy = Math.min(H - my, Math.max(my - vh, vy));
  }

  // The level whose pixels are at least as fine as the screen's device pixels.
  function levelFor(s) {
    const l = MAX + Math.ceil(Math.log2(s * dpr) - 1e-9);
    return Math.max(BASE, Math.min(MAX, l));
  }

  // The folder name may hold characters that mean something in a URL (#, ?, %): encoded.
  const FILES = encodeURIComponent(CONFIG.files) + "/";
  function tileUrl(l, c, r) { return FILES + l + "/" + c + "_" + r + "." + CONFIG.format; }

  function tile(l, c, r) {
    const key = l + "/" + c + "_" + r;
    let t = cache.get(key);
    if (!t) {
      t = { img: null, ok: false, failed: false, used: 0, l: l, c: c, r: r };
      cache.set(key, t);
    }
    return t;
  }

  function load(t) {
    if (t.img || t.failed || loading >= MAX_LOADS) return;
    loading++;
    const img = new Image();
    t.img = img;
    img.onload = function () { loading--; t.ok = true; redraw(); };
    img.onerror = function () { loading--; t.failed = true; redraw(); };
    img.src = tileUrl(t.l, t.c, t.r);
  }

  // Tiles of level l that cover the visible part of the image: [c0, c1] x [r0, r1].
  function visibleTiles(l) {
    const f = Math.pow(2, MAX - l);  // image pixels per level pixel
    const [lw, lh] = sizes[l];
    const x0 = Math.max(0, vx / f), y0 = Math.max(0, vy / f);
    const x1 = Math.min(lw, (vx + cssW / scale) / f), y1 = Math.min(lh, (vy + cssH / scale) / f);
    if (x1 <= x0 || y1 <= y0) return null;
    return [Math.floor(x0 / TILE), Math.floor(y0 / TILE),
            Math.min(Math.ceil(lw / TILE) - 1, Math.floor(x1 / TILE)), Math.min(Math.ceil(lh / TILE) - 1, Math.floor(y1 / TILE))];
  }

  function drawTile(t, l) {
    const f = Math.pow(2, MAX - l);
    const x = Math.max(0, t.c * TILE - OV) * f, y = Math.max(0, t.r * TILE - OV) * f;
    ctx.drawImage(t.img, (x - vx) * scale, (y - vy) * scale, t.img.naturalWidth * f * scale, t.img.naturalHeight * f * scale);
  }

  function draw() {
    pending = false;
    frame++;
    const w = canvas.clientWidth, h = canvas.clientHeight, d = window.devicePixelRatio || 1;
    if (w !== cssW || h !== cssH || d !== dpr) {  // keep the centre where it was
      const cx = vx + cssW / scale / 2, cy = vy + cssH / scale / 2;
      cssW = Math.max(1, w); cssH = Math.max(1, h); dpr = d;
      canvas.width = Math.round(cssW * dpr); canvas.height = Math.round(cssH * dpr);
      if (fitted) { fit(); return; }
      vx = cx - cssW / scale / 2; vy = cy - cssH / scale / 2;
    }
    clampView();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    ctx.save();
    ctx.beginPath();  // the last row and column of a level may reach a fraction past the image
    ctx.rect(-vx * scale, -vy * scale, W * scale, H * scale);
    ctx.clip();
    ctx.imageSmoothingQuality = "high";
    const target = levelFor(scale);
    const want = [];
    // Coarse to fine: what is loaded of each level, so a blurred image shows until the sharp tiles come.
    for (let l = BASE; l <= target; l++) {
      const v = visibleTiles(l);
      if (!v) continue;
      for (let r = v[1]; r <= v[3]; r++) {
        for (let c = v[0]; c <= v[2]; c++) {
          const t = tile(l, c, r);
          if (t.ok) { drawTile(t, l); t.used = frame; }
          else if (l === target || l === BASE) want.push(t);
        }
      }
    }
    ctx.restore();
    // Request what is missing, the base level first, then from the centre outwards.
    const mx = vx + cssW / scale / 2, my = vy + cssH / scale / 2;
    want.sort(function (a, b) {
      if (a.l !== b.l) return a.l === BASE ? -1 : 1;
      return dist(a, mx, my) - dist(b, mx, my);
    });
    for (const t of want) load(t);
    evict();
    const pct = scale * dpr * 100;  // toPrecision alone writes 20000 as "2.00e+4"
    info.textContent = (pct >= 100 ? Math.round(pct).toString() : pct.toPrecision(3)) + "%  " + W + " \u00d7 " + H;
  }

  function dist(t, x, y) {
    const f = Math.pow(2, MAX - t.l) * TILE;
    return Math.hypot((t.c + 0.5) * f - x, (t.r + 0.5) * f - y);
  }

  function evict() {
    if (cache.size <= CACHE_TILES) return;
    const old = [];
    for (const [key, t] of cache) if (t.l !== BASE && t.used !== frame && (t.ok || t.failed)) old.push([t.used, key]);
    old.sort(function (a, b) { return a[0] - b[0]; });
    for (let i = 0; i < old.length && cache.size > CACHE_TILES; i++) cache.delete(old[i][1]);
  }

  function redraw() {
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }

  // Pointers: one drags, two pinch (zoom about their midpoint and follow it).
  const pointers = new Map();
  let pinch = null;

  function pinchState() {
    const [a, b] = Array.from(pointers.values());
    return { d: Math.hypot(a.x - b.x, a.y - b.y), x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
  }

  canvas.addEventListener("pointerdown", function (e) {
    canvas.setPointerCapture(e.pointerId);
    pointers.set(e.pointerId, { x: e.offsetX, y: e.offsetY });
    canvas.classList.add("dragging");
    pinch = pointers.size === 2 ? pinchState() : null;
  });
  canvas.addEventListener("pointermove", function (e) {
    const p = pointers.get(e.pointerId);
    if (!p) return;
    const dx = e.offsetX - p.x, dy = e.offsetY - p.y;
    p.x = e.offsetX; p.y = e.offsetY;
    if (pointers.size === 1) panBy(dx, dy);
    else if (pointers.size === 2 && pinch) {
      const now = pinchState();
      panBy(now.x - pinch.x, now.y - pinch.y);
      if (pinch.d > 0) zoomAt(now.d / pinch.d, now.x, now.y);
      pinch = now;
    }
  });
  function release(e) {
    pointers.delete(e.pointerId);
    pinch = pointers.size === 2 ? pinchState() : null;
    if (!pointers.size) canvas.classList.remove("dragging");
  }
  canvas.addEventListener("pointerup", release);
  canvas.addEventListener("pointercancel", release);

  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    const lines = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? cssH : 1;
    zoomAt(Math.exp(-e.deltaY * lines * 0.002), e.offsetX, e.offsetY);
  }, { passive: false });

  canvas.addEventListener("dblclick", function (e) { zoomAt(e.shiftKey ? 0.5 : 2, e.offsetX, e.offsetY); });

  document.getElementById("zoom-in").onclick = function () { zoomAt(2, cssW / 2, cssH / 2); };
  document.getElementById("zoom-out").onclick = function () { zoomAt(0.5, cssW / 2, cssH / 2); };
  document.getElementById("fit").onclick = fit;
  document.getElementById("actual").onclick = function () { zoomAt(1 / (scale * dpr), cssW / 2, cssH / 2); };

  window.addEventListener("keydown", function (e) {
    const step = 80;
    switch (e.key) {
      case "+": case "=": zoomAt(2, cssW / 2, cssH / 2); break;
      case "-": case "_": zoomAt(0.5, cssW / 2, cssH / 2); break;
      case "0": fit(); break;
      case "1": zoomAt(1 / (scale * dpr), cssW / 2, cssH / 2); break;
      case "ArrowLeft": panBy(step, 0); break;
      case "ArrowRight": panBy(-step, 0); break;
      case "ArrowUp": panBy(0, step); break;
      case "ArrowDown": panBy(0, -step); break;
      default: return;
    }
    e.preventDefault();
  });
  window.addEventListener("resize", redraw);

  cssW = Math.max(1, canvas.clientWidth); cssH = Math.max(1, canvas.clientHeight);
  dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(cssW * dpr); canvas.height = Math.round(cssH * dpr);
  fit();
})();
</script>
</body>
</html>
"""
