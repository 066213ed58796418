#!/usr/bin/env python
"""Slab load time of a simulated ImageNet-size cache: 1,281,167 samples, k = 10, 2 seeds, local disk.
A student's epoch reads one seed whole (log-probabilities, indices, tail mass and view parameters); goal
<= 0.25 s per seed. Also times plain zarr reads of logp + indices alone, the floor. The arrays are written
with kdcache's real schema (kdcache.cache.schema) and realistic-looking top-k logits; no teacher runs.

    python tools/bench_slab.py [--dir /tmp/slab-bench] [--samples 1281167] [--topk 10] [--seeds 2] [--recipe a2]

--recipe a2 fills the view parameters with the real rows of VanillaKD's A2 augmentation (RandAugment
rand-m7-mstd0.5, mixup 0.1, cutmix 1.0) for ImageNet-like image sizes, so the bytes per view on disk are
those of such a cache; the default fills RandomResizedCrop rows. Bytes are reported per array.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def write_simulated(path: Path, args):
    """Write the simulated cache at `path` (replaced): args.samples samples, args.topk, args.classes, args.seeds seeds,
    args.recipe, args.values_dtype, args.unit_size / args.chunk_rows (None: kdcache's defaults). -> (spec, seconds)"""
    from kdcache.augment import ViewRecipe, view_params
    from kdcache.cache.integrity import unit_records
    from kdcache.cache.schema import CacheSpec, TeacherCache, encode_logp
    shutil.rmtree(path, ignore_errors=True)
    n, k = args.samples, args.topk
    recipe = ViewRecipe(size=224, **(dict(aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0) if args.recipe == "a2" else {}))
    spec = CacheSpec(teacher={"name": "simulated", "sha256": "0" * 64, "num_classes": args.classes,
                              "mean": [0.5] * 3, "std": [0.5] * 3},
                     dataset={"fingerprint": "simulated", "split": "train", "split_fingerprint": "simulated",
                              "num_samples": n, "num_classes": args.classes, "view_size": 224, "path": ""},
                     recipe=recipe.to_dict(), global_seed=0, topk=k, values_dtype=args.values_dtype,
                     **{k_: v for k_, v in (("unit_size", args.unit_size), ("chunk_rows", args.chunk_rows)) if v})
    seeds = list(range(args.seeds))
    cache = TeacherCache.create_or_open(path, spec, seeds)
    rng = np.random.default_rng(0)
    heights = rng.integers(200, 501, n)      # ImageNet-like canonical sizes (most are near 375 x 500)
    widths = rng.integers(200, 501, n)
    t = time.time()
    for s in seeds:
        arrays = cache.arrays(s)
        for b in range(spec.num_blocks):
            a, e = spec.block_bounds(b)
            m = e - a
            logits = np.sort(rng.normal(0, 2, (m, k)).astype(np.float32), 1)[:, ::-1] + rng.normal(8, 1, (m, 1))
            lse = logits[:, 0] + rng.uniform(0.1, 2.0, m)
            logp = logits - lse[:, None]
            arrays["logp"][a:e] = encode_logp(logp, spec.values_dtype)
            arrays["indices"][a:e] = rng.integers(0, args.classes, (m, k)).astype(np.int16)
            arrays["log_tail"][a:e] = np.log1p(-np.minimum(np.exp(logp).sum(1), 0.999)).astype(np.float32)
            arrays["params"][a:e] = view_params(recipe, 0, s, np.arange(a, e), heights[a:e], widths[a:e], n)
            cache.ledger.mark_done(s, b, {"views": m, "correct": 0, "run": "bench", "rank": 0,
                                          "objects": unit_records(cache, s, b)})  # checked on read, as in a dump
    return spec, time.time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/kdcache-slab-bench")
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--unit-size", type=int, default=None, help="default: kdcache's CacheSpec default")
    p.add_argument("--chunk-rows", type=int, default=None, help="default: kdcache's CacheSpec default")
    p.add_argument("--values-dtype", default="uint16", choices=["uint16", "float32"])
    p.add_argument("--recipe", default="rrc", choices=["rrc", "a2"])
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import zarr
    from kdcache.cache.schema import TeacherCache
    from kdcache.cache.slabs import read_slab
    path = Path(args.dir)
    n, k = args.samples, args.topk
    spec, write_s = write_simulated(path, args)

    cold = None
    if drop_page_cache():
        t = time.perf_counter()
        read_slab(TeacherCache.open(path), 0)
        cold = time.perf_counter() - t
    full, plain = [], []
    for r in range(args.repeats):
        for s in range(args.seeds):
            c = TeacherCache.open(path)
            t = time.perf_counter()
            slab = read_slab(c, s)
            full.append(time.perf_counter() - t)
            g = zarr.open_group(str(path), mode="r")[f"seeds/{s:06d}"]
            t = time.perf_counter()
            g["logp"][...], g["indices"][...]
            plain.append(time.perf_counter() - t)
    assert slab.logp.shape == (n, k) and np.isfinite(slab.log_tail).all()
    per_array = {name: sum(f.stat().st_size for f in (path / "seeds").glob(f"*/{name}/**/*") if f.is_file()
                           and f.name != "zarr.json") / (n * args.seeds)
                 for name in ("logp", "indices", "log_tail", "params")}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "recipe": args.recipe, "param_columns": int(slab.params.shape[1]), "bytes_per_view": per_array,
              "unit_size": spec.unit_size, "chunk_rows": spec.chunk_rows,
              "samples": n, "topk": k, "values_dtype": spec.values_dtype, "seeds": args.seeds, "write_s": write_s,
              "bytes_on_disk": TeacherCache.open(path).bytes_on_disk(),
              "slab_s_median": statistics.median(full), "slab_s_all": full,
              "plain_values_indices_s_median": statistics.median(plain), "slab_s_cold": cold}
    print(f"unit size {spec.unit_size}, chunk rows {spec.chunk_rows}")
    print(f"simulated cache: {n} samples, k={k}, {args.seeds} seeds, {result['bytes_on_disk'] / 2**20:.0f} MiB on disk "
          f"(written in {write_s:.1f} s)")
    print(f"bytes per view on disk ({args.recipe} recipe, {slab.params.shape[1]} parameter columns): "
          + ", ".join(f"{name} {b:.1f}" for name, b in per_array.items()) + f"; total {sum(per_array.values()):.1f}")
    print(f"slab per seed (logp, indices, log_tail, params; completeness check included): median "
          f"{result['slab_s_median']:.3f} s over {len(full)} reads (goal <= 0.25 s)"
          + (f"; cold page cache {cold:.3f} s" if cold is not None else "; page cache could not be dropped here"))
    print(f"plain zarr logp + indices: median {result['plain_values_indices_s_median']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
