#!/usr/bin/env python
"""Writes an ImageNet-shaped ImageFolder tree of synthetic JPEGs (smooth random patterns, varied sizes
around 375x500) for benchmarks at ImageNet resolution without ImageNet.

    python tools/make_synthetic_imagefolder.py OUT --classes 10 --per-class 200 --val-per-class 20
"""

import argparse
import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image


def photo(rng, height, width):
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = [127 + 110 * np.sin(rng.uniform(0.005, 0.08) * yy + rng.uniform(0.005, 0.08) * xx + rng.uniform(0, 6.3))
             for _ in range(3)]
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray((np.stack(chans, -1) + noise).clip(0, 255).astype(np.uint8))


def _write(job):
    path, h, w, seed = job
    photo(np.random.default_rng(seed), h, w).save(path, quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: about 375x500)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    jobs = []
    for split, n in (("train", args.per_class), ("val", args.val_per_class)):
        for c in range(args.classes):
            d = args.out / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                h, w = (int(rng.integers(300, 420) * args.scale), int(rng.integers(400, 560) * args.scale))
                if rng.random() < 0.3:
                    h, w = w, h
                jobs.append((d / f"n{c:08d}_{j}.JPEG", h, w, int(rng.integers(2 ** 63))))
    with multiprocessing.Pool(args.workers) as pool:
        pool.map(_write, jobs, chunksize=16)
    print(f"wrote {len(jobs)} images to {args.out}")


if __name__ == "__main__":
    main()
