"""Exact tiling: plans, receptive fields, and tiled == whole-image results."""

import itertools
import math

import numpy as np
import pytest
import torch

from ultrastyle.core.arch import ARCHS
from ultrastyle.core.canvas import Canvas, CanvasSite, canvas_from_array
from ultrastyle.core.padding import padded_size
from ultrastyle.core.plan import GPU_HOST_CACHE_MACS_PER_VALUE, TilingOptions, check_budget, plan_image, plan_stage, plan_stages
from ultrastyle.core.receptive import decoder_radius, encoder_radius, stage_radius
from ultrastyle.core.tiling import Span, plan_tiles
from ultrastyle.core.traits import EAGER_DEVICE, EAGER_HOST, RunnerTraits
from ultrastyle.models.networks import Decoder, Encoder
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.cascade import DEFAULT_LEVELS, style_statistics, stylize
from ultrastyle.runtime.tiled import mirrored_indices, style_statistics_tiled, stylize_stage_tiled, stylize_tiled

# float32 tolerance of tiled vs whole-image results in [0, 1].
ATOL = {torch.float32: 1e-4}


@pytest.mark.parametrize(
    "h,w,core,halo,grid",
    [(64, 64, 16, 8, 8), (48, 80, 32, 16, 16), (2, 10, 1, 1, 1), (160, 32, 48, 0, 16), (16, 16, 64, 32, 16), (96, 32, 24, 12, 4)],
)
@pytest.mark.parametrize("uniform", [False, True])
def test_tile_cores_cover_every_pixel_exactly_once(h, w, core, halo, grid, uniform):
    hits = np.zeros((h, w), int)
    for t in plan_tiles(h, w, core, halo, grid, uniform):
        hits[t.rows.start : t.rows.stop, t.cols.start : t.cols.stop] += 1
    assert (hits == 1).all()


@pytest.mark.parametrize("h,w,core,halo,grid", [(96, 160, 32, 24, 16), (100, 44, 30, 7, 1), (64, 256, 64, 64, 16), (48, 48, 16, 40, 8)])
def test_uniform_regions_have_one_shape_and_keep_the_halo_around_every_core(h, w, core, halo, grid):
    tiles = plan_tiles(h, w, core, halo, grid, uniform=True)
    halo = -(-halo // grid) * grid
    assert len({(t.region_rows.size, t.region_cols.size) for t in tiles}) == 1
    for t in tiles:
        for span, region, length in ((t.rows, t.region_rows, h), (t.cols, t.region_cols, w)):
            assert 0 <= region.start <= span.start and span.stop <= region.stop <= length
            assert region.start % grid == 0 and region.stop % grid == 0
            # an inner region edge lies at least the halo away from the core; an edge at the border needs none
            assert region.start == 0 or span.start - region.start >= halo
            assert region.stop == length or region.stop - span.stop >= halo


def test_tile_regions_sit_on_the_grid_and_border_tiles_start_at_the_border():
    h, w, core, halo, grid = 96, 160, 32, 24, 16  # halo rounds up to 32
    tiles = plan_tiles(h, w, core, halo, grid)
    for t in tiles:
        for s in (t.rows, t.cols, t.region_rows, t.region_cols):
            assert s.start % grid == 0 and s.stop % grid == 0
        assert t.region_rows.start == max(0, t.rows.start - 32) and t.region_rows.stop == min(h, t.rows.stop + 32)
        assert t.region_cols.start == max(0, t.cols.start - 32) and t.region_cols.stop == min(w, t.cols.stop + 32)
    assert tiles[0].region_rows.start == 0 and tiles[0].region_cols.start == 0
    assert tiles[-1].region_rows.stop == h and tiles[-1].region_cols.stop == w


def test_split_rejects_sizes_off_the_grid():
    from ultrastyle.core.tiling import split_axis

    with pytest.raises(ValueError, match="multiple of the grid"):
        split_axis(50, 16, 16, 16)


def _random_net(stage: int, spec=ARCHS["cd16x"]):
    torch.manual_seed(stage)
    enc, dec = Encoder(spec, stage).double(), Decoder(spec, stage).double()
    for p in (*enc.parameters(), *dec.parameters()):
        p.data.normal_(0, 0.3) if p.dim() > 1 else p.data.fill_(0.1)  # keep ReLUs alive so influence spreads
    return enc, dec


def _influence(fn, x: torch.Tensor, at: int, axis: int = -1) -> tuple[int, int]:
    """Outputs along ``axis`` that change when input pixel ``at`` (centre row, column ``at``) is perturbed."""
    with torch.no_grad():
        y0 = fn(x)
        x2 = x.clone()
        x2[..., x.shape[-2] // 2, at] += 1.0
        changed = ((fn(x2) - y0).abs().amax(dim=(0, 1, 2)) > 0).nonzero().flatten()
    return int(changed.min()), int(changed.max())


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_receptive_field_equals_brute_force_probe(stage):
    spec = ARCHS["cd16x"]
    enc, dec = _random_net(stage)
    g, n = spec.grid(stage), 352
    # Short and wide: only the spread along columns is measured, rows just need two grid cells.
    x = torch.rand(1, 3, 2 * g, n, dtype=torch.float64)
    worst = 0
    for phase in range(g):
        c = n // 2 + phase
        lo, hi = _influence(lambda t: dec(enc(t)), x, c)
        worst = max(worst, c - lo, hi - c)
    assert worst == stage_radius(spec, stage)
    # Encoder alone: pixel p reaches feature j when p lies within R of j's cell [j*g, j*g + g - 1].
    reach = 0
    for p in range(n // 2, n // 2 + g):
        lo, hi = _influence(enc, x, p)
        reach = max(reach, p - (lo * g + g - 1), hi * g - p)
    assert reach == encoder_radius(spec, stage)
    # Decoder alone, in feature pixels: feature q reaches output o when |o // g - q| <= R.
    with torch.no_grad():
        f = enc(x)
    q = f.shape[-1] // 2
    lo, hi = _influence(dec, f, q)
    assert max(q - lo // g, hi // g - q) == decoder_radius(spec, stage)


@pytest.fixture(scope="module")
def cd16x(cd16x_dir):
    return load_cd_folder(cd16x_dir)


def _tiled(model, content: torch.Tensor, style_img: torch.Tensor, opts: TilingOptions, *, method="wct", levels=DEFAULT_LEVELS):
    stats = style_statistics_tiled(model, canvas_from_array(style_img.numpy(), layout="chw"), levels, opts)
    with canvas_from_array(content.numpy(), layout="chw") as cv:
        out = stylize_tiled(model, cv, stats, opts, method=method, alpha=0.6, levels=levels)
        try:
            return torch.from_numpy(out.numpy().copy())
        finally:
            out.close()


def _assert_equal_to_whole(model, content, style_img, opts, *, method="wct", levels=DEFAULT_LEVELS):
    ref = stylize(model, content, style_statistics(model, style_img, levels), method=method, levels=levels)
    got = _tiled(model, content, style_img, opts, method=method, levels=levels)
    assert got.shape == ref.shape
    diff = (got.clamp(0, 1) - ref.clamp(0, 1)).abs()
    assert diff.max() <= ATOL[torch.float32], f"max {diff.max():.2e} mean {diff.mean():.2e}"


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", [(96, 128), (101, 77)])
def test_tiled_single_stage_equals_whole_image(cd16x, style, stage, size):
    torch.manual_seed(0)
    content = torch.rand(3, *size)
    for cache, uniform in ((False, False), (True, False), (False, True), (True, True)):
        opts = TilingOptions(tile=32, cache_features=cache, uniform_tiles=uniform)
        _assert_equal_to_whole(cd16x, content, style, opts, levels=(stage,))


@pytest.mark.parametrize("method", ["wct", "adain"])
@pytest.mark.parametrize(
    "crop,tile",
    [
        ((0, 0, 160, 192), 48),  # multiple of 16, tiles smaller than the image in both directions
        ((3, 5, 117, 203), 64),  # not a multiple of 16
        ((0, 0, 90, 70), 512),  # image smaller than one tile
        ((40, 0, 1, 300), 64),  # a 1-pixel-high strip
        ((0, 40, 300, 1), 64),  # a 1-pixel-wide strip
        ((0, 0, 300, 40), 48),  # tall
        ((100, 0, 30, 320), 80),  # wide
    ],
)
def test_tiled_cascade_equals_whole_image(cd16x, style, photo, method, crop, tile):
    r, c, h, w = crop
    content = photo[:, r : r + h, c : c + w]
    assert content.shape[1:] == (h, w)
    _assert_equal_to_whole(cd16x, content, style, TilingOptions(tile=tile), method=method)


def test_disk_canvases_give_the_same_result_as_ram(cd16x, style, photo, tmp_path):
    content = photo[:, :96, :144]
    ram = _tiled(cd16x, content, style, TilingOptions(tile=48))
    disk_opts = TilingOptions(tile=48, ram_canvas_limit=0, scratch_dir=tmp_path)
    assert disk_opts.resolve(EAGER_HOST).canvas_site(cd16x.arch, 96, 144, DEFAULT_LEVELS) == CanvasSite(disk_dir=str(tmp_path))
    disk = _tiled(cd16x, content, style, disk_opts)
    assert torch.equal(ram, disk)
    assert list(tmp_path.iterdir()) == []  # scratch files are unlinked


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_consumed_content_is_reused_in_ram_and_replaced_on_disk(cd16x, style, photo, tmp_path, monkeypatch, on_disk):
    """Later stages write into a consumed content's RAM; a scratch file is closed and a fresh one made.

    Writing tiles into an old scratch file reads each page a row ends in back
    from the disk first once the file has left the page cache (1 GP: 792 s
    for one pass); a fresh, preallocated file has nothing to read.
    """
    import ultrastyle.runtime.tiled as tiled

    content = photo[:, :96, :144].contiguous()
    opts = TilingOptions(tile=48, ram_canvas_limit=0, scratch_dir=tmp_path) if on_disk else TilingOptions(tile=48)
    stats = style_statistics(cd16x, style, DEFAULT_LEVELS)
    outs, inner = [], tiled.stylize_stage_tiled

    def spy(model, src, *args, out=None, **kwargs):
        outs.append((out, [c._file is not None for c in opened]))
        return inner(model, src, *args, out=out, **kwargs)

    monkeypatch.setattr(tiled, "stylize_stage_tiled", spy)
    cv = canvas_from_array(content.numpy(), layout="chw", disk_dir=tmp_path if on_disk else None)
    opened = [cv]
    result = stylize_tiled(cd16x, cv, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS, consume_content=True)
    try:
        assert result.on_disk == on_disk and len(outs) == len(DEFAULT_LEVELS)
        if on_disk:
            assert all(out is None for out, _ in outs)
            assert outs[0][1] == [True] and outs[1][1] == [False]  # the content's file closed before stage 2 runs
        else:
            assert outs[0][0] is None and outs[1][0] is cv and all(out is not None for out, _ in outs[1:])
        with canvas_from_array(content.numpy(), layout="chw") as fresh:
            want = stylize_tiled(cd16x, fresh, stats, opts, method="wct", alpha=0.6, levels=DEFAULT_LEVELS)
        assert np.array_equal(result.numpy(), want.numpy())
        want.close()
    finally:
        result.close()
        cv.close()


class _RecordingCanvas(Canvas):
    """A RAM canvas that records where tiles are written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = []

    def write_tensor(self, row, col, block):
        self.writes.append((row, col))
        super().write_tensor(row, col, block)


class _PrefetchLog(Canvas):
    """A RAM canvas that logs the regions read and prefetched, in order (posing as a disk canvas, which is prefetched)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = []

    @property
    def on_disk(self):
        return True

    def prefetch(self, rows, cols):
        self.log.append(("prefetch", np.asarray(rows).tolist(), np.asarray(cols).tolist()))
        super().prefetch(rows, cols)

    def read_tensor(self, rows, cols, device):
        self.log.append(("read", np.asarray(rows).tolist(), np.asarray(cols).tolist()))
        return super().read_tensor(rows, cols, device)


def test_each_pass_prefetches_the_tile_it_reads_next(cd16x, style, photo):
    """While a tile computes, the disk is already reading the next one's region (`Canvas.prefetch`)."""
    content = photo[:, :96, :144].contiguous().numpy()
    stats = style_statistics(cd16x, style, (1,))
    plan = plan_image(cd16x.arch, 96, 144, (1,), TilingOptions(tile=48), EAGER_HOST).stage(1)
    n_enc, n_dec = len(plan.encode_tiles()), len(plan.decode_tiles())
    src = _PrefetchLog(3, 96, 144)
    src.write(0, 0, content)
    stylize_stage_tiled(cd16x, src, stats, plan, method="wct", alpha=0.6)
    reads = [e[1:] for e in src.log if e[0] == "read"]
    assert len(reads) == n_enc + n_dec > 4
    for k, event in enumerate(src.log):
        if event[0] == "prefetch":  # the advice names the very next read, and comes before it
            assert next(e for e in src.log[k + 1 :] if e[0] == "read")[1:] == event[1:]
    prefetched = [e[1:] for e in src.log if e[0] == "prefetch"]
    assert prefetched == reads[1:n_enc] + reads[n_enc + 1 :]  # all but each pass's first


@pytest.mark.parametrize("stage", [1, 4])  # stage 1 encodes again in pass 2; stage 4 reads cached features
def test_pass_two_runs_its_tiles_last_first(cd16x, style, photo, stage):
    """Pass 1 forwards, pass 2 backwards: each sweep starts on what the one before touched last.

    That is what the page cache still holds when disk canvases outgrow RAM
    (docs/gigapixel.md); a change back to forwards would pass every equality
    test and cost 6% at 100 MP with a small page cache.
    """
    content = photo[:, :96, :144].contiguous()
    stats = style_statistics(cd16x, style, (stage,))
    plan = plan_image(cd16x.arch, 96, 144, (stage,), TilingOptions(tile=48), EAGER_HOST).stage(stage)
    assert plan.cache == (stage == 4)
    scale = plan.grid if plan.cache else 1
    cores = [(t.rows.start * scale, t.cols.start * scale) for t in plan.decode_tiles()]
    out = _RecordingCanvas(3, 96, 144)
    with canvas_from_array(content.numpy(), layout="chw") as src:
        stylize_stage_tiled(cd16x, src, stats, plan, method="wct", alpha=0.6, out=out)
    assert len(cores) > 2 and out.writes == cores[::-1]


def test_budget_tiling_equals_whole_image_and_uses_several_tiles(cd16x, style, photo):
    opts = TilingOptions(max_memory=24 * 2**20)
    h, w = photo.shape[1:]
    for plan in plan_image(cd16x.arch, h, w, DEFAULT_LEVELS, opts, EAGER_HOST).stages:  # the plan this run makes
        assert len(plan.encode_tiles()) > 1 and len(plan.decode_tiles()) > 1, plan.stage
    _assert_equal_to_whole(cd16x, photo, style, opts)


def test_an_image_whose_area_fits_the_budget_runs_as_one_tile_whatever_its_shape():
    from dataclasses import replace

    from ultrastyle.core.tile_memory import region_side_for_budget

    spec, opts = ARCHS["cd16x"], TilingOptions(max_memory=256 * 2**20)
    for k in range(1, 6):
        side = region_side_for_budget(spec, k, opts.max_memory)
        h, w = side // 2, side * 3 // 2  # 3/4 of the square's area, 1.5x its width
        wide = plan_stage(spec, k, h, w, opts)
        assert len(wide.encode_tiles()) == 1 and len(wide.decode_tiles()) == 1
        assert wide.encode_tiles()[0].region_cols == Span(0, padded_size(w, spec.grid(k)))  # no halo: the image
        squares = plan_stage(spec, k, h, w, replace(opts, whole_if_area_fits=False))
        assert len(squares.encode_tiles()) > 1  # bounded by the square side, as TensorRT profiles need
        too_big = plan_stage(spec, k, side, side * 3 // 2, opts)  # 1.5x the area
        assert len(too_big.encode_tiles()) > 1
        bounded = RunnerTraits(bounded_regions=True)  # a runner bounded per side: no wide whole
        assert len(plan_stages(spec, h, w, (k,), opts, bounded)[0].encode_tiles()) > 1


def test_tiled_style_statistics_equal_whole_image_statistics(cd16x, photo):
    whole = style_statistics(cd16x, photo, DEFAULT_LEVELS)
    tiled = style_statistics_tiled(cd16x, canvas_from_array(photo.numpy(), layout="chw"), DEFAULT_LEVELS, TilingOptions(tile=64))
    for k in DEFAULT_LEVELS:
        assert tiled[k].count == whole[k].count
        # Float32 band GEMMs, float64 sums: error ~1e-6 of the covariance's scale, whatever the tiling.
        scale = float(whole[k].covariance().abs().max())
        torch.testing.assert_close(tiled[k].covariance(), whole[k].covariance(), rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(tiled[k].mean, whole[k].mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on_tensor", [False, True], ids=["ram", "tensor"])
def test_a_region_read_mirrors_past_the_bottom_right_edge(on_tensor, device):
    a = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    cv = Canvas(2, 5, 7, device=device if on_tensor else None)
    cv.write(0, 0, a)
    got = cv.read_tensor(*mirrored_indices(cv, Span(2, 8), Span(4, 10)), device)[None]
    assert got.device.type == device.type and got.is_contiguous()
    rows, cols = [2, 3, 4, 3, 2, 1], [4, 5, 6, 5, 4, 3]
    assert np.array_equal(got[0].cpu().numpy(), a[:, rows][:, :, cols])


def test_tensor_canvas_reads_and_writes_as_a_ram_canvas(device):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ram, dev = canvas_from_array(pixels), canvas_from_array(pixels, device=device)
    assert dev.device.type == device.type and ram.device is None
    assert np.array_equal(ram.numpy(), dev.numpy())  # the uint8 -> [0, 1] division on the device matches the host's
    block = torch.from_numpy(rng.random((3, 9, 11), dtype=np.float32))
    for cv in (ram, dev):
        cv.write_tensor(30, 45, block[:, :7, :8].to(device))  # clipped by the caller to the canvas, as pass 2 does
        cv.write(0, 0, block.numpy())
    assert np.array_equal(ram.numpy(), dev.numpy())
    got = dev.read_tensor(slice(30, 37), slice(45, 53), device)
    assert torch.equal(got.cpu(), block[:, :7, :8])
    got.zero_()  # a read is a copy: the canvas keeps its pixels
    assert np.array_equal(dev.rows_band(30, 37)[:, :, 45:], block[:, :7, :8].numpy())
    dev.close()
    with pytest.raises(ValueError, match="closed"):
        dev.numpy()


def test_tensor_canvases_give_the_same_stage_output_as_ram_canvases(cd16x, cd16x_dir, style, photo, device):
    from ultrastyle.runtime.backends.torch_backend import TorchRunner

    content = photo[:, :96, :128].contiguous()
    model = cd16x if device.type == "cpu" else load_cd_folder(cd16x_dir).to(device)
    outs = []
    with TorchRunner(model) as runner:  # IEEE float32 on CUDA
        stats = style_statistics(runner, style.to(device), (4,))
        plan = plan_image(runner.arch, 96, 128, (4,), TilingOptions(tile=32), runner.traits, runner.device).stage(4)
        assert len(plan.encode_tiles()) > 1
        for site in (CanvasSite(), CanvasSite(device=device)):
            src = canvas_from_array(content.numpy(), layout="chw", device=site.device)
            out = stylize_stage_tiled(runner, src, stats, plan, method="wct", alpha=0.6, site=site)
            assert (out.device is None) == (site.device is None)
            outs.append(out.numpy().copy())
    assert np.array_equal(outs[0], outs[1])


def test_canvases_go_where_the_budget_is_and_share_it_only_there(cd16x, tmp_path):
    arch, h, w = cd16x.arch, 2000, 3000
    need = TilingOptions().canvas_bytes(arch, h, w, DEFAULT_LEVELS)
    assert 2**26 < need < 2**30
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def site(budget_bytes, budget, device, ram=8 * 2**30, **kw):
        plan = plan_image(arch, h, w, DEFAULT_LEVELS, TilingOptions(max_memory=budget_bytes, scratch_dir=tmp_path, **kw),
                          RunnerTraits(budget_memory=budget), device, ram_available=ram)  # fmt: skip
        return plan.site, plan.options.max_memory

    # Host budget (CPU): RAM while the canvases take at most a quarter of it, which the tiles then lose.
    assert site(4 * need, "host", cpu) == (CanvasSite(), 3 * need)
    assert site(4 * need - 4, "host", cpu) == (CanvasSite(disk_dir=str(tmp_path)), 4 * need - 4)
    # Device budget, tensors on the GPU: on the device up to half the budget (shared with the tiles) ...
    assert site(2 * need, "device", cuda) == (CanvasSite(device=cuda), need)
    # ... else without the feature caches a GPU re-encodes faster than it would ship them over the bus ...
    lean = TilingOptions(cache_macs_per_value=GPU_HOST_CACHE_MACS_PER_VALUE).canvas_bytes(arch, h, w, DEFAULT_LEVELS)
    assert lean < need
    assert site(2 * need - 2, "device", cuda) == (CanvasSite(device=cuda), 2 * need - 2 - lean)
    # ... else in host RAM (half of what is available), which the device budget does not count ...
    assert site(2 * lean - 2, "device", cuda) == (CanvasSite(), 2 * lean - 2)
    assert site(2 * lean - 2, "device", cuda, ram_canvas_limit=lean - 1)[0] == CanvasSite(disk_dir=str(tmp_path))
    assert site(lean, "device", cuda, ram=2 * lean - 2)[0] == CanvasSite(disk_dir=str(tmp_path))
    # ... and never on the device for runners whose tiles cross as host arrays (TensorRT, ORT's CUDA provider).
    assert site(64 * need, "device", cpu) == (CanvasSite(), 64 * need)
    # Unbounded: in the runner's memory, whatever their size, the tiles unbounded too.
    assert site(None, "host", cpu) == (CanvasSite(), None)
    assert site(None, "device", cuda, ram=0) == (CanvasSite(device=cuda), None)
    assert site(None, "device", cpu, ram=0) == (CanvasSite(), None)


@pytest.mark.parametrize("mp", [16, 100])
def test_a_gpu_caches_only_features_that_cost_more_to_encode_than_to_ship(mp):
    # Canvases off the GPU (or made to fit on it by leaving caches out): a stage caches only where its
    # encoder costs GPU_HOST_CACHE_MACS_PER_VALUE per cached float; on the CPU the RAM rule stays.
    from ultrastyle.core.plan import CACHE_MACS_PER_VALUE, encoder_macs_per_value

    arch = ARCHS["cd16x"]
    h, w = (4096, 4096) if mp == 16 else (7500, 13333)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cost = {k: encoder_macs_per_value(arch, k) for k in DEFAULT_LEVELS}
    gpu = {k for k, c in cost.items() if c >= GPU_HOST_CACHE_MACS_PER_VALUE}
    host = {k for k, c in cost.items() if c >= CACHE_MACS_PER_VALUE}
    assert gpu == {5} and host == {2, 3, 4, 5}  # cd16x: stage 5 alone ships fewer bytes than it saves

    def plan(traits, device, **kw):
        p = plan_image(arch, h, w, DEFAULT_LEVELS, TilingOptions(max_memory=2 * 2**30), traits, device, ram_available=64 * 2**30, **kw)
        return p.site, {s.stage for s in p.stages if s.cache}

    site, cached = plan(EAGER_DEVICE, cuda)
    assert cached == gpu
    # 16 MP: the canvases with every cache take over half the budget; without the cheap ones they fit on the GPU
    assert site == (CanvasSite(device=cuda) if mp == 16 else CanvasSite())
    # TensorRT, ORT on CUDA (tensors cross as host arrays): the CPU rule, which their engine profiles are sized for
    assert plan(RunnerTraits(budget_memory="device"), cpu)[1] == host
    assert plan(EAGER_HOST, cpu)[1] == host
    assert plan(EAGER_DEVICE, cuda, masked=True)[1] == set(DEFAULT_LEVELS)  # masks transform cached features
    small = plan_image(arch, 1024, 1024, DEFAULT_LEVELS, TilingOptions(max_memory=2 * 2**30), EAGER_DEVICE, cuda)
    assert small.site == CanvasSite(device=cuda) and {s.stage for s in small.stages if s.cache} == host  # on the GPU: every cache


def test_feature_caches_are_left_out_where_the_scratch_disk_cannot_hold_them(tmp_path):
    from ultrastyle.core.plan import DISK_SHARE

    arch, h, w = ARCHS["cd16x"], 20000, 30000  # canvases on disk at a 1 GB budget
    options = TilingOptions(max_memory=2**30, scratch_dir=tmp_path)
    need = options.canvas_bytes(arch, h, w, DEFAULT_LEVELS)
    without = TilingOptions(max_memory=2**30, cache_features=False).canvas_bytes(arch, h, w, DEFAULT_LEVELS)
    assert without < need

    def caches(free, **kw):
        plan = plan_image(arch, h, w, DEFAULT_LEVELS, options, EAGER_HOST, disk_free=free, **kw)
        assert plan.site == CanvasSite(disk_dir=str(tmp_path))
        return [p.cache for p in plan.stages]

    assert any(caches(None)) and caches(None) == caches(int(need / DISK_SHARE) + 1)
    assert not any(caches(int(need / DISK_SHARE) - 1))  # pass 2 encodes again rather than fill the disk
    assert all(caches(1 << 50, masked=True))  # masks transform cached features: kept (a disk that cannot hold them: refused)


def test_scratch_larger_than_ram_caches_only_expensive_encoders(tmp_path):
    from ultrastyle.core.plan import CACHE_MACS_PER_VALUE, DISK_CACHE_MACS_PER_VALUE, encoder_macs_per_value

    arch, h, w = ARCHS["cd16x"], 20000, 30000
    options = TilingOptions(max_memory=2**30, scratch_dir=tmp_path)
    need = options.canvas_bytes(arch, h, w, DEFAULT_LEVELS)

    def cached(ram, **kw):
        plan = plan_image(arch, h, w, DEFAULT_LEVELS, options, EAGER_HOST, ram_available=ram, **kw)
        return {p.stage for p in plan.stages if p.cache}

    cost = {k: encoder_macs_per_value(arch, k) for k in DEFAULT_LEVELS}
    in_ram = {k for k, c in cost.items() if c >= CACHE_MACS_PER_VALUE}
    on_disk = {k for k, c in cost.items() if c >= DISK_CACHE_MACS_PER_VALUE}
    assert on_disk and on_disk < in_ram  # some stage, not every one, is left out
    assert cached(None) == cached(need) == in_ram
    assert cached(need - 1) == on_disk  # the page cache cannot hold them: cheap encoders encode again
    assert cached(0, masked=True) == set(DEFAULT_LEVELS)  # masks need every cache
    # the RAM rule comes first: a disk that holds the smaller caches keeps them
    smaller = TilingOptions(max_memory=2**30, cache_macs_per_value=DISK_CACHE_MACS_PER_VALUE).canvas_bytes(arch, h, w, DEFAULT_LEVELS)
    assert smaller < need
    from ultrastyle.core.plan import DISK_SHARE

    assert cached(0, disk_free=int(smaller / DISK_SHARE) + 1) == on_disk


def test_the_budget_is_the_runners_unless_the_options_say(cd16x):
    from ultrastyle.runtime.backends.base import runner_traits
    from ultrastyle.runtime.backends.torch_backend import TorchRunner

    assert TilingOptions().resolve(TorchRunner(cd16x).traits).budget == "host"
    assert TilingOptions().resolve(runner_traits(cd16x)).budget == "host"  # a bare model: where its tensors live
    assert TilingOptions().resolve(RunnerTraits(budget_memory="device")).budget == "device"
    assert TilingOptions(budget="host").resolve(RunnerTraits(budget_memory="device")).budget == "host"
    with pytest.raises(ValueError, match="'host' or 'device'"):
        TilingOptions(budget="gpu").resolve(EAGER_HOST)
    with pytest.raises(ValueError, match="'host' or 'device'"):
        RunnerTraits(budget_memory="gpu")


def test_plan_stage_halos_follow_receptive_fields_on_the_grid():
    spec = ARCHS["cd16x"]
    for k, (h, w) in itertools.product(range(1, 6), [(100, 37)]):
        plan = plan_stage(spec, k, h, w, TilingOptions(tile=64))
        g = spec.grid(k)
        assert plan.enc_halo % g == 0 and plan.enc_halo >= encoder_radius(spec, k) > plan.enc_halo - g
        assert plan.full_halo % g == 0 and plan.full_halo >= stage_radius(spec, k) > plan.full_halo - g
        assert (plan.height, plan.width) == (padded_size(h, g), padded_size(w, g))


@pytest.mark.parametrize("stage", [2, 4, 5])
def test_forward_core_equals_slicing_the_full_output(cd16x, stage):
    g = 2 ** (stage - 1)
    torch.manual_seed(stage)
    x = torch.rand(1, 3, 12 * g, 10 * g)
    with torch.no_grad():
        f = cd16x.encoders[stage](x)
        y = cd16x.decoders[stage](f)
        for rows, cols in [(slice(0, 12), slice(0, 10)), (slice(3, 9), slice(7, 10)), (slice(11, 12), slice(0, 1))]:
            fc = cd16x.encoders[stage].forward_core(x, rows, cols)
            assert fc.shape[-2:] == (rows.stop - rows.start, cols.stop - cols.start)
            assert (fc - f[..., rows, cols]).abs().max() <= 1e-4 * f.abs().max()
            out_rows, out_cols = slice(rows.start * g + 1, rows.stop * g), slice(cols.start * g, cols.stop * g - 1)
            yc = cd16x.decoders[stage].forward_core(f, out_rows, out_cols)
            assert (yc - y[..., out_rows, out_cols]).abs().max() <= 1e-5


def test_needed_windows_shrink_toward_the_output_and_stay_on_the_grid():
    from ultrastyle.core.receptive import needed_windows

    layers = ARCHS["cd16x"].encoder_layers(4)
    wins = needed_windows(layers, 10, 20, 256)  # feature rows 10..19 of a 256-row input
    assert wins[-1] == (10, 20)
    assert wins[0][0] % 8 == 0 and wins[0][1] % 8 == 0  # input window on encoder 4's grid
    first = wins[0]
    assert first[0] >= 10 * 8 - encoder_radius(ARCHS["cd16x"], 4) - 8 and first[1] <= 20 * 8 + encoder_radius(ARCHS["cd16x"], 4) + 8
    assert all(a <= b for a, b in wins)


def test_balanced_cores_avoid_slivers():
    from ultrastyle.core.tiling import balanced_core

    assert balanced_core(1008, 1000, 8) == 504
    assert balanced_core(2000, 1000, 16) == 1000
    assert balanced_core(48, 1000, 16) == 48
    sizes = [t.rows.size for t in plan_tiles(1008, 16, 1000, 160, 8) if t.cols.start == 0]
    assert sizes == [504, 504]


def test_reduced_halo_never_exceeds_the_exact_one():
    spec = ARCHS["cd16x"]
    for k in range(1, 6):
        exact = plan_stage(spec, k, 512, 512, TilingOptions(tile=128))
        small = plan_stage(spec, k, 512, 512, TilingOptions(tile=128, halo=64))
        assert small.enc_halo == min(exact.enc_halo, 64) and small.full_halo == min(exact.full_halo, 64)
        assert small.dec_halo <= exact.dec_halo


# -- one plan per image, from the options and the runner's traits -------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["style", "mask"])
def test_unbounded_tiling_is_the_whole_image_cascade_bit_for_bit(cd16x, style, photo, masked):
    from ultrastyle.core.styles import Regions, Target
    from ultrastyle.runtime.cascade import style_statistics as whole_statistics

    levels = DEFAULT_LEVELS
    content = photo[:, :200, :270].contiguous()
    stats = whole_statistics(cd16x, style, levels)
    tiled_stats = style_statistics_tiled(cd16x, canvas_from_array(style.numpy(), layout="chw"), levels, TilingOptions.unbounded())
    for k in levels:  # the same computation, not merely close
        assert tiled_stats[k].count == stats[k].count
        assert torch.equal(tiled_stats[k].sum, stats[k].sum) and torch.equal(tiled_stats[k].outer, stats[k].outer)
    target = Target((stats,))
    if masked:
        labels = np.zeros(content.shape[1:], np.int64)
        labels[:, 100:] = 1
        target = Regions(labels, (Target((stats,)), Target((stats,), (1.0,))))
    ref = stylize(cd16x, content, target, method="wct", levels=levels)
    plan = plan_image(cd16x.arch, *content.shape[1:], levels, TilingOptions.unbounded(), EAGER_HOST, masked=masked)
    assert plan.keep_bytes is None and plan.site == CanvasSite() and all(p.one_tile for p in plan.stages)
    with canvas_from_array(content.numpy(), layout="chw") as cv:
        out = stylize_tiled(cd16x, cv, target, TilingOptions.unbounded(), method="wct", alpha=0.6, levels=levels)
        try:
            assert torch.equal(torch.from_numpy(out.numpy()), ref)
        finally:
            out.close()


def test_stylize_tiled_plans_each_image_once(cd16x, style, photo, monkeypatch):
    import ultrastyle.runtime.tiled as tiled

    calls = []
    real = tiled.plan_image
    monkeypatch.setattr(tiled, "plan_image", lambda *a, **kw: calls.append(a[1:4]) or real(*a, **kw))
    content = photo[:, :96, :144].contiguous()
    _tiled(cd16x, content, style, TilingOptions(tile=48))
    assert calls == [(96, 144, DEFAULT_LEVELS)]  # one plan for the five stages (the style's statistics plan none)


def test_plans_are_a_function_of_size_options_and_traits_only():
    spec, opts = ARCHS["cd16x"], TilingOptions(max_memory=2**30, ram_canvas_limit=2**30)
    a = plan_image(spec, 3000, 2000, DEFAULT_LEVELS, opts, RunnerTraits(default_memory_factor=2.5))
    assert a == plan_image(spec, 3000, 2000, DEFAULT_LEVELS, opts, RunnerTraits(default_memory_factor=2.5))
    b = plan_image(spec, 3000, 2000, DEFAULT_LEVELS, opts, EAGER_HOST)
    assert all(p.encode_core <= q.encode_core for p, q in zip(a.stages, b.stages)) and a != b
    # resolved once: the plan's options say what every stage was planned with
    assert a.options.budget == "host" and a.options.uniform_tiles is False and a.options.whole_if_area_fits is True
    assert a.options.max_memory == opts.max_memory - opts.canvas_bytes(spec, 3000, 2000, DEFAULT_LEVELS)
    assert a.keep_bytes == int(a.options.max_memory * EAGER_HOST.cache_share)
    assert [p.stage for p in a.stages] == [1, 2, 3, 4, 5] and a.stage(4).stage == 4


@pytest.mark.parametrize("size", [(97, 97), (3000, 3000), (8192, 8192), (600, 6000)])
def test_regions_stay_within_the_runners_largest_region(size):
    spec = ARCHS["cd16x"]
    limits = {1: 256, 2: 300, 3: 512, 4: 768, 5: 1024}
    traits = RunnerTraits(budget_memory="device", bounded_regions=True, max_regions=limits)
    for opts in (TilingOptions(max_memory=8 * 2**30), TilingOptions.unbounded(), TilingOptions(max_memory=64 * 2**20)):
        for plan in plan_image(spec, *size, DEFAULT_LEVELS, opts, traits).stages:
            g, scale = plan.grid, plan.grid if plan.cache else 1  # cached pass-2 tiles are in feature pixels
            regions = [(t.region_rows.size, t.region_cols.size) for t in plan.encode_tiles()]
            regions += [(t.region_rows.size * scale, t.region_cols.size * scale) for t in plan.decode_tiles()]
            assert max(max(r) for r in regions) <= limits[plan.stage], (opts, plan)
            if max(size) > limits[plan.stage]:  # cores as large as the limit allows: one more grid cell would not fit
                assert plan.encode_core + g + 2 * plan.enc_halo > limits[plan.stage] or opts.max_memory == 64 * 2**20


def test_a_fixed_tile_or_a_region_limit_that_cannot_fit_is_refused_saying_what_fits():
    spec = ARCHS["cd16x"]
    small = RunnerTraits(bounded_regions=True, max_regions={k: 768 for k in range(1, 6)})
    with pytest.raises(ValueError, match=r"tiles of 2048 px make \d+-px regions at stage \d.*at most \d+ px"):
        plan_image(spec, 4000, 4000, DEFAULT_LEVELS, TilingOptions(tile=2048), small)
    with pytest.raises(ValueError, match=r"tiles of 2048 px"):
        check_budget(spec, DEFAULT_LEVELS, TilingOptions(tile=2048), small)
    plan_image(spec, 700, 700, DEFAULT_LEVELS, TilingOptions(tile=2048), small)  # an image within the limit: one region
    tiny = RunnerTraits(bounded_regions=True, max_regions={k: 64 for k in range(1, 6)})
    with pytest.raises(ValueError, match="too small for any tile"):
        check_budget(spec, DEFAULT_LEVELS, TilingOptions(), tiny)
    check_budget(spec, DEFAULT_LEVELS, TilingOptions(), small)


def test_check_budget_says_what_one_tile_of_a_stage_needs():
    spec = ARCHS["cd16x"]
    with pytest.raises(ValueError, match=r"^the memory budget of 1 MiB cannot hold one tile of stage \d; at least \d+ MiB is needed$"):
        check_budget(spec, DEFAULT_LEVELS, TilingOptions(max_memory=2**20), EAGER_HOST)
    for budget in (256 * 2**20, None):
        check_budget(spec, DEFAULT_LEVELS, TilingOptions(max_memory=budget), EAGER_HOST)
    check_budget(spec, DEFAULT_LEVELS, TilingOptions(max_memory=2**20, tile=64), EAGER_HOST)  # a fixed tile overrides the budget
    # The bound is the planner's: just below it, a large image's plan fails the same way; at it, it plans.
    msg = ""
    try:
        check_budget(spec, (5,), TilingOptions(max_memory=8 * 2**20), RunnerTraits(default_memory_factor=2.5))
    except ValueError as exc:
        msg = str(exc)
    need = int(float(msg.split("at least ")[1].split(" MiB")[0]) * 2**20)
    check_budget(spec, (5,), TilingOptions(max_memory=need), RunnerTraits(default_memory_factor=2.5))
    plan_stage(spec, 5, 4000, 4000, TilingOptions(max_memory=need), 2.5)


def test_the_least_budget_check_budget_names_plans_every_image_size(tmp_path):
    """Canvases in RAM would take their share of the least budget from the tiles: there they go on disk instead."""
    spec = ARCHS["cd16x"]
    traits = RunnerTraits(default_memory_factor=2.5)
    with pytest.raises(ValueError, match="at least") as info:
        check_budget(spec, (5, 4), TilingOptions(max_memory=2**20), traits)
    need = math.ceil(float(str(info.value).split("at least ")[1].split(" MiB")[0]) * 2**20)
    check_budget(spec, (5, 4), TilingOptions(max_memory=need), traits)
    placed = {}
    for side in (200, 400, 800, 1600):  # small canvases stay in RAM; near the least budget they go on disk
        plan = plan_image(spec, side, side, (5, 4), TilingOptions(max_memory=need, scratch_dir=tmp_path), traits)
        placed[side] = plan.site.disk_dir is None
    roomy = plan_image(spec, 800, 800, (5, 4), TilingOptions(max_memory=4 * need, scratch_dir=tmp_path), traits)
    assert roomy.site.disk_dir is None  # with room for both, the canvases stay in RAM
    assert not all(placed.values()), placed  # the case this is about happened: some size needed the disk


@pytest.mark.parametrize("levels", [(5, 4, 3), (5, 4)])
def test_a_consumed_content_canvas_is_reused_and_changes_nothing(cd16x, photo, style, tmp_path, levels):
    content, style_img = photo[:, :96, :128], style[:, :64, :64]
    opts = TilingOptions(tile=32, scratch_dir=tmp_path)
    want = _tiled(cd16x, content, style_img, opts, levels=levels)
    stats = style_statistics_tiled(cd16x, canvas_from_array(style_img.numpy(), layout="chw"), levels, opts)
    cv = Canvas(3, 96, 128)  # in RAM: a scratch file is replaced instead (the test below)
    cv.write(0, 0, content.numpy())
    out = stylize_tiled(cd16x, cv, stats, opts, method="wct", alpha=0.6, levels=levels, consume_content=True)
    got = out.numpy().copy()
    assert np.array_equal(got, want.numpy())
    # Later stages wrote into the content's canvas: with an even number of stages it is the result.
    assert (out is cv) == (len(levels) % 2 == 0)
    assert not np.array_equal(cv.numpy(), content.numpy())
    out.close()
    cv.close()


def test_check_budget_on_a_gpu_allows_for_the_stages_that_may_encode_again():
    # Where a GPU re-encodes cheap stages (canvases off it), pass 2 of those stages has the whole stage's halo:
    # the least budget checked up front is at least what such a plan needs.
    from ultrastyle.core.plan import BudgetTooSmall

    arch, cuda = ARCHS["cd16x"], torch.device("cuda")

    levels = (4,)  # stage 4 caches on a CPU, encodes again on a GPU with host canvases (stage 5 caches either way)

    def least(device):
        try:
            check_budget(arch, levels, TilingOptions(max_memory=2**20), EAGER_DEVICE, device)
        except BudgetTooSmall as exc:
            return exc.need
        raise AssertionError("1 MiB held a tile")

    assert least(cuda) > least(None)  # None: tensors on the host, the CPU rule
    need = least(cuda)
    check_budget(arch, levels, TilingOptions(max_memory=need), EAGER_DEVICE, cuda)  # the figure it names is enough
    plan = plan_image(arch, 8192, 8192, levels, TilingOptions(max_memory=need), EAGER_DEVICE, cuda, ram_available=2**34)
    assert plan.site.device is None and not plan.stage(4).cache  # such a plan: host canvases, stage 4 encodes again
