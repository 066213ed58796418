#!/usr/bin/env python
"""Diagnostic: how the multi-view renderer (decode + crop/resize/flip, numba prange) scales with threads,
and (--breakdown) where one thread's time goes: JPEG decode per image vs crop/resize/flip per view, with
OpenCV's INTER_AREA (the renderer's, via FFCV's resize_crop) and INTER_LINEAR on the same crops for scale.

    python tools/render_scaling.py --data DIR [--size 224] [--views 1] [--breakdown]
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
    p.add_argument("--breakdown", action="store_true", help="one-thread decode vs resize cost, then exit")
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
    if args.breakdown:
        breakdown(jpegs, h, w, params[:, 0], size)
        return
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


def _best_us(fn, items, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best / len(items) * 1e6


def breakdown(jpegs, heights, widths, params, size):
    import cv2
    from kdcache.augment.render import _renderer, crop_box
    cv2.setNumThreads(1)
    r = _renderer()
    images = [np.empty((hh, ww, 3), np.uint8) for hh, ww in zip(heights, widths)]
    out = np.empty((size, size, 3), np.uint8)
    jobs = list(zip(jpegs, heights, widths, images, params))
    decode_us = _best_us(lambda j: r.decode_into(np.frombuffer(j[0], np.uint8), np.uint32(j[1]), np.uint32(j[2]), j[3]), jobs)
    render_us = _best_us(lambda j: r.render_into(j[3], j[4], out), jobs)
    crops = []
    for _, hh, ww, image, row in jobs:
        top, left, ch, cw = crop_box(hh, ww, row)
        crops.append(image[top:top + ch, left:left + cw])
    area_us = _best_us(lambda c: cv2.resize(c, (size, size), dst=out, interpolation=cv2.INTER_AREA), crops)
    linear_us = _best_us(lambda c: cv2.resize(c, (size, size), dst=out, interpolation=cv2.INTER_LINEAR), crops)
    side = np.mean([np.sqrt(c.shape[0] * c.shape[1]) for c in crops])
    print(f"{len(jobs)} images of mean {np.mean(heights):.0f}x{np.mean(widths):.0f} px, views at {size} px "
          f"(mean crop side {side:.0f} px), one thread:")
    print(f"  JPEG decode            {decode_us:7.0f} us per image")
    print(f"  crop + resize + flip   {render_us:7.0f} us per view (renderer: OpenCV INTER_AREA)")
    print(f"  cv2 INTER_AREA alone   {area_us:7.0f} us per view; INTER_LINEAR {linear_us:.0f} us (for scale)")
    for s in (1, 4, 16):
        print(f"  S={s:<2}: {decode_us / s + render_us:7.0f} us per view, resize share {render_us / (decode_us / s + render_us):.0%}")


if __name__ == "__main__":
    main()
