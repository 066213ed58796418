#!/usr/bin/env python
"""Local disk against an S3-compatible object store, side by side in one run:
  1. slab load time per seed (what a student reads per pass) of a simulated ImageNet-size cache:
     1,281,167 samples, k = 10, written with kdcache's schema and unit markers (checksums included);
  2. dump-teacher throughput (img/s) into a cache on local disk and on the object store, same teacher,
     same data, one after the other.

The object store is moto's S3 server started on loopback (the test dependency), unless --s3 names a
bucket prefix of a real one (credentials and AWS_ENDPOINT_URL from the environment). moto keeps objects
in its own process's memory and serves them over HTTP on the same cores: it measures kdcache's
request pattern and overheads, not a real store's bandwidth.

    python tools/bench_store.py --data data/fm4096                      # both parts, moto on loopback
    python tools/bench_store.py --skip-dump --samples 1281167
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def start_moto() -> str:
    import logging
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    import s3fs
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("kdcache-bench")
    return "s3://kdcache-bench"


def simulated_cache(where, n: int, k: int, seeds: int, classes: int = 1000):
    """A cache whose rows look like top-k of a 1000-class teacher, units marked as dump-teacher marks them."""
    from kdcache.augment import ViewRecipe, view_params
    from kdcache.cache.integrity import unit_records
    from kdcache.cache.schema import CacheSpec, TeacherCache, encode_logp
    recipe = ViewRecipe(size=224)
    spec = CacheSpec(teacher={"name": "simulated", "sha256": "0" * 64, "num_classes": classes,
                              "mean": [0.5] * 3, "std": [0.5] * 3},
                     dataset={"fingerprint": "simulated", "split": "train", "split_fingerprint": "simulated",
                              "num_samples": n, "num_classes": classes, "view_size": 224, "path": ""},
                     recipe=recipe.to_dict(), global_seed=0, topk=k)
    cache = TeacherCache.create_or_open(where, spec, list(range(seeds)))
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(200, 501, n), rng.integers(200, 501, n)
    for s in range(seeds):
        arrays = cache.arrays(s)
        for b in range(spec.num_blocks):
            a, e = spec.block_bounds(b)
            m = e - a
            logits = np.sort(rng.normal(0, 2, (m, k)).astype(np.float32), 1)[:, ::-1] + rng.normal(8, 1, (m, 1))
            logp = logits - (logits[:, 0] + rng.uniform(0.1, 2.0, m))[:, None]
            arrays["logp"][a:e] = encode_logp(logp, spec.values_dtype)
            arrays["indices"][a:e] = rng.integers(0, classes, (m, k)).astype(np.int16)
            arrays["log_tail"][a:e] = np.log1p(-np.minimum(np.exp(logp).sum(1), 0.999)).astype(np.float32)
            arrays["params"][a:e] = view_params(recipe, 0, s, np.arange(a, e), heights[a:e], widths[a:e], n)
            cache.ledger.mark_done(s, b, {"views": m, "correct": 0, "run": "bench", "rank": 0,
                                          "objects": unit_records(cache, s, b)})
    return cache


def slab_times(where, seeds: int, repeats: int):
    from kdcache.cache.schema import TeacherCache
    from kdcache.cache.slabs import read_slab
    times = []
    for _ in range(repeats):
        for s in range(seeds):
            t = time.perf_counter()
            cache = TeacherCache.open(where)   # a student opens the cache once; included here: the worst case
            read_slab(cache, s)
            times.append(time.perf_counter() - t)
    return times


def dump_rate(data: str, where: str, teacher: str, seeds: str, batch_size: int, unit_size: int) -> dict:
    from kdcache.models import ModelSpec
    from kdcache.teacher.dump import DumpConfig, dump_teacher
    a, b = (int(x) for x in seeds.split(":"))
    cfg = DumpConfig(data=Path(data), out=where, seeds=list(range(a, b)), topk=10,
                     teacher=ModelSpec(name=teacher, random_init=True, seed=0), batch_size=batch_size, progress=False,
                     unit_size=unit_size)
    s = dump_teacher(cfg)
    return {"img_per_s": s["img_per_s"], "views_per_s": s["views_per_s"], "seconds": s["seconds"],
            "loop_seconds": s["loop_seconds"], "units": len(cfg.seeds) * -(-s["views_written"] // len(cfg.seeds) // unit_size)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3", default=None, help="s3://bucket/prefix of a real store (default: moto on loopback)")
    p.add_argument("--data", default=None, help="prepared dataset for the dump part")
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--dump-seeds", default="0:2")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--unit-size", type=int, default=1024,
                   help="dump part: samples per unit (small: several passes, so writes can overlap compute)")
    p.add_argument("--skip-dump", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    s3 = args.s3 or start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-store-bench-"))
    run = f"{s3}/bench-{int(time.time())}"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "store": "moto on loopback" if not args.s3 else args.s3, "samples": args.samples, "topk": args.topk}
    try:
        t = time.time()
        simulated_cache(tmp / "slab", args.samples, args.topk, args.seeds)
        result["write_local_s"] = time.time() - t
        t = time.time()
        simulated_cache(f"{run}/slab", args.samples, args.topk, args.seeds)
        result["write_s3_s"] = time.time() - t
        local, remote = [], []
        for _ in range(args.repeats):  # interleaved: the machine's noise hits both alike
            local += slab_times(tmp / "slab", args.seeds, 1)
            remote += slab_times(f"{run}/slab", args.seeds, 1)
        result.update(slab_local_s=statistics.median(local), slab_s3_s=statistics.median(remote),
                      slab_local_all=local, slab_s3_all=remote)
        print(f"slab per seed ({args.samples} samples, k={args.topk}, checksums checked): local disk "
              f"{result['slab_local_s']:.3f} s, S3 {result['slab_s3_s']:.3f} s (median of {len(local)}); "
              f"written in {result['write_local_s']:.1f} s / {result['write_s3_s']:.1f} s")
        if args.data and not args.skip_dump:
            u = args.unit_size
            dump_rate(args.data, str(tmp / "warm-up"), args.teacher, "0:1", args.batch_size, u)  # numba JIT, caches
            result["dump_local"] = dump_rate(args.data, str(tmp / "dump"), args.teacher, args.dump_seeds, args.batch_size, u)
            result["dump_s3"] = dump_rate(args.data, f"{run}/dump", args.teacher, args.dump_seeds, args.batch_size, u)
            dl, ds = result["dump_local"], result["dump_s3"]
            extra = (ds["loop_seconds"] - dl["loop_seconds"]) / ds["units"]
            print(f"dump {args.teacher}, seeds {args.dump_seeds}, {ds['units']} units of {u} samples: local disk "
                  f"{dl['img_per_s']:.0f} img/s, S3 {ds['img_per_s']:.0f} img/s (S3/local "
                  f"{ds['img_per_s'] / dl['img_per_s']:.2f}); S3 costs {extra:.3f} s more per unit")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
