"""The float64 feature statistics (`FeatureStats.of`: Σf, Σffᵀ) on the CPU, by torch's intra-op thread count, on a quiet
machine and beside one busy process.

The statistics run in 1 MiB bands of a handful of torch ops each, every op an OpenMP region across torch's threads: a
thread descheduled by another process stalls each region. This prints the median milliseconds (of 7) for the maps of
one megapixel through CD 16x's five stages (random ReLU features of their widths), with 2 threads and with 1, and
again with a busy-looping process beside it (``--busy``).

    python benchmarks/feature_stats.py
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from ultrastyle.core.transforms import FeatureStats

# (channels, height, width) of stages 1-5 of CD 16x for a 1024 x 1024 content
SHAPES = {1: (16, 1024, 1024), 2: (32, 512, 512), 3: (64, 256, 256), 4: (128, 128, 128), 5: (128, 64, 64)}


@contextlib.contextmanager
def busy(on: bool) -> Iterator[None]:
    """One other process spinning on a core while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        time.sleep(0.5 if on else 0)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def median_ms(feats: list[torch.Tensor], threads: int, repeats: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for f in feats:
                FeatureStats.of(f)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    feats = [torch.relu(torch.randn(1, *s) + 0.3) * 2 for s in SHAPES.values()]
    print("| machine | 2 threads, ms | 1 thread, ms |\n|---|---|---|")
    for load in (False, True):
        with busy(load):
            two, one = median_ms(feats, 2, args.repeats), median_ms(feats, 1, args.repeats)
        print(f"| {'one busy process beside' if load else 'quiet'} | {two:.0f} | {one:.0f} |")


if __name__ == "__main__":
    main()
