#!/usr/bin/env python
"""Diagnostic: how the multi-view renderer (decode + crop/resize/flip, numba prange) scales with threads.

    python tools/render_scaling.py --data DIR [--size 224] [--views 1]
"""

import argparse
import os
import time

import numba
import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--samples", type=int, default=256)
    args = p.parse_args()
    from kdcache.augment import ViewRecipe, view_params
    from kdcache.augment.render import SampleBuffers, render_samples
    from kdcache.data.dataset import PreparedDataset
    ds = PreparedDataset.open(args.data)
    split = ds.split("train")
    size = args.size or ds.view_size
    m = min(args.samples, split.num_samples)
    reader = split.jpeg_reader()
    jpegs = [reader[i] for i in range(m)]
    h, w = split.sizes[:m, 0], split.sizes[:m, 1]
    params = np.stack([view_params(ViewRecipe(size=size), 0, s, np.arange(m), h, w) for s in range(args.views)], 1)
    out = np.empty((m, args.views, size, size, 3), np.uint8)
    buffers = SampleBuffers()
    render_samples(jpegs, h, w, params, size, out=out, buffers=buffers)
    print(f"cpu_count {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}, numba {numba.__version__}, "
          f"threading layer {numba.threading_layer()}, default threads {numba.config.NUMBA_NUM_THREADS}")
    threads = sorted({t for t in (1, 2, 4, 8, 16) if t <= numba.config.NUMBA_NUM_THREADS} | {numba.config.NUMBA_NUM_THREADS})
    for t in threads:
        numba.set_num_threads(t)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            render_samples(jpegs, h, w, params, size, out=out, buffers=buffers)
            best = min(best, time.perf_counter() - t0)
        print(f"threads {t:>2}: {best / (m * args.views) * 1e6:8.1f} us/view, {m / best:8.0f} img/s")


if __name__ == "__main__":
    main()
