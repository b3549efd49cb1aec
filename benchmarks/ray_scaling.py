"""Ray scale-out: batch throughput with 1 and 2 worker nodes, Ray's overhead against the local path, one large image across the cluster.

Inputs are made from the shared photos (JPEG, quality 95, in a temp folder):
``--count`` photos of ``--mp`` megapixels and one style. Reported, in one run:

- ``local``: `runtime.batch.run_batch` in this process with all cores
  (threads 0) and with one thread, the network's and torch's (what one Ray
  worker of one CPU gets: Ray sets its OMP_NUM_THREADS to 1);
- ``ray N nodes``: without ``--address``, a local Ray cluster started here
  (`ray.cluster_utils.Cluster`, a head without CPUs and N worker nodes of one
  CPU each, every process bound to 127.0.0.1), a `WorkerPool` of N actors, the
  same batch; the pool's start-up (Ray processes, actors opening the model)
  is shown apart from the batch's wall time. With ``--address HOST:PORT`` the
  batch runs on that cluster's workers instead (one row);
- ``tiles``: with ``--tiles-mp X``, one X-megapixel image with
  ``distribute_tiles`` on the largest pool, against the local tiled run of
  the same image (``--tiles-local`` to include it: as long again), and the
  largest absolute difference of the two outputs (uint8).

Every row is the median of ``--repeats`` runs after one warm-up; the machine is
shared, so absolute times are this moment's. On a 2-core machine two
one-CPU nodes are all the cores there are: the driver, Ray's own processes
and the two workers share them, so 2 nodes cannot reach 2x here.

    .venv/bin/python benchmarks/ray_scaling.py --count 8 --mp 1
    .venv/bin/python benchmarks/ray_scaling.py --tiles-mp 100 --tiles-local --max-memory 1GB
    .venv/bin/python benchmarks/ray_scaling.py --address 10.0.0.5:6379 --count 200 --mp 12 --tiles-mp 400
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
STYLE = SHARED / "images/style/cd_style_in1.jpg"
MODEL = SHARED / "models/cd-wct-16x"


def make_inputs(folder: Path, count: int, mp: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((SHARED / "images/large").glob("*.jpg")) + sorted((SHARED / "images/content").glob("*.jpg"))
    out = []
    for i in range(count):
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = (mp * 1e6 / (w * h)) ** 0.5
            p = folder / f"photo{i:03d}.jpg"
            im.resize((max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.LANCZOS).save(p, quality=95)
            out.append(p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="join this Ray cluster (HOST:PORT) instead of starting local ones")
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--levels", default="5,4,3,2,1")
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--mp", type=float, default=1.0)
    ap.add_argument("--nodes", default="1,2", help="worker node counts of the local clusters")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-memory", default="1GB")
    ap.add_argument("--tiles-mp", type=float, default=0.0, help="also run one image of this many MP across the cluster")
    ap.add_argument("--tiles-local", action="store_true", help="and the same image locally, to compare")
    ap.add_argument("--work", default=None, help="folder for inputs, outputs and stage arrays (a shared folder on a cluster)")
    args = ap.parse_args()

    from ultrastyle.api import make_options
    from ultrastyle.distributed.cluster import connect, import_ray
    from ultrastyle.distributed.pool import WorkerPool
    from ultrastyle.models.sources import model_defaults
    from ultrastyle.runtime.backends.select import open_runner
    from ultrastyle.runtime.batch import run_batch
    from ultrastyle.runtime.pairs import StyleSpec, plan_pairs

    work = Path(args.work or tempfile.mkdtemp(prefix="ray_scaling_"))
    contents = make_inputs(work / "in", args.count, args.mp)
    opts = make_options(model_defaults(args.model), levels=args.levels, max_memory=args.max_memory, io_workers=1)
    total_mp = args.count * args.mp
    rows: list[tuple[str, int, float, float | None]] = []

    def batch_pairs(tag: str):
        out = work / f"out_{tag}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return plan_pairs(contents, [StyleSpec((STYLE,))], out, "png")

    import torch

    default_threads = torch.get_num_threads()
    for threads, tag in ((0, "local, all cores"), (1, "local, 1 thread")):
        # One thread: the network's and torch's own (a Ray actor of one CPU gets OMP_NUM_THREADS=1 from Ray).
        torch.set_num_threads(threads or default_threads)
        with open_runner(args.model, backend=args.backend, stages=opts.levels, threads=threads, progress=False) as r:
            t = median_seconds(lambda: run_batch(r, batch_pairs("local"), opts), args.repeats)
        rows.append((tag, 1, t, None))
        print(f"{tag}: {t:.1f} s", flush=True)
    torch.set_num_threads(default_threads)

    def ray_rows(tag: str, address: str, workers: int | None) -> WorkerPool:
        t0 = time.perf_counter()
        pool = WorkerPool(args.model, address=address, workers=workers, backend=args.backend, stages=opts.levels)
        start = time.perf_counter() - t0
        t = median_seconds(lambda: pool.run_batch(batch_pairs("ray"), opts), args.repeats)
        rows.append((tag, len(pool.workers), t, start))
        print(f"{tag}: {t:.1f} s (pool start {start:.1f} s)", flush=True)
        return pool

    tiles = []
    if args.address:
        pool = ray_rows(f"ray at {args.address}", args.address, None)
        tiles_run(args, pool, opts, work, tiles)
        pool.close()
    else:
        ray = import_ray(loopback=True)
        from ray.cluster_utils import Cluster

        counts = [int(n) for n in args.nodes.split(",")]
        for n in counts:
            c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False))
            for _ in range(n):
                c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            c.wait_for_nodes()
            connect(c.address)
            try:
                pool = ray_rows(f"ray, {n} node(s) of 1 CPU", c.address, n)
                if n == max(counts):
                    tiles_run(args, pool, opts, work, tiles)
                pool.close()
            finally:
                ray.shutdown()
                c.shutdown()

    local = rows[0][2]
    print(f"\n{args.count} photos of {args.mp:g} MP ({total_mp:g} MP), {args.backend}, levels {args.levels}, "
          f"max_memory {args.max_memory}; {os.cpu_count()} cores; medians of {args.repeats}; times of a shared machine\n")  # fmt: skip
    print("| run | workers | batch wall s | s/MP | images/min | vs local all cores | pool start s |")
    print("|---|---|---|---|---|---|---|")
    for tag, n, t, start in rows:
        print(f"| {tag} | {n} | {t:.1f} | {t / total_mp:.2f} | {60 * args.count / t:.1f} | {t / local:.2f}x | "
              f"{'' if start is None else f'{start:.1f}'} |")  # fmt: skip
    for line in tiles:
        print(line)


def tiles_run(args, pool, opts, work: Path, out: list[str]) -> None:
    """One ``--tiles-mp`` image across the pool (and locally with ``--tiles-local``)."""
    if not args.tiles_mp:
        return
    from ultrastyle.runtime.backends.select import open_runner
    from ultrastyle.runtime.batch import run_batch
    from ultrastyle.runtime.pairs import StyleSpec, plan_pairs

    (big,) = make_inputs(work / "big", 1, args.tiles_mp)
    pairs = lambda tag: plan_pairs([big], [StyleSpec((STYLE,))], _fresh(work / f"big_{tag}"), "png")  # noqa: E731
    t0 = time.perf_counter()
    s = pool.run_batch(pairs("ray"), opts, distribute_tiles=True)
    t = time.perf_counter() - t0
    assert s.count("done") == 1, s.results[0].error
    out.append(f"\ntiles: one {args.tiles_mp:g} MP image across {len(pool.workers)} workers: {t:.1f} s ({t / args.tiles_mp:.2f} s/MP)")
    if args.tiles_local:
        with open_runner(args.model, backend=args.backend, stages=opts.levels, progress=False) as r:
            t0 = time.perf_counter()
            run_batch(r, pairs("local"), opts)
            tl = time.perf_counter() - t0
        a = np.asarray(Image.open(next((work / "big_ray").glob("*.png")))).astype(int)
        b = np.asarray(Image.open(next((work / "big_local").glob("*.png")))).astype(int)
        out.append(f"tiles: the same image locally (all cores): {tl:.1f} s ({tl / args.tiles_mp:.2f} s/MP); "
                   f"ray / local {t / tl:.2f}x; max |ray - local| = {np.abs(a - b).max()} (uint8)")  # fmt: skip


def _fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


if __name__ == "__main__":
    main()
