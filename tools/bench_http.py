#!/usr/bin/env python
"""Slab load per seed from a root published over HTTP (issue 21), next to local disk, in one run: the simulated
ImageNet-size cache of tools/bench_slab.py (1,281,167 samples, k = 10, 2 seeds) in a cache root, published
with `kdcache publish`, served by aiohttp's static files (tools/static_server.py) in a separate process on
loopback. Also times publish itself: the first (every object checksummed), a re-publish of an unchanged root
(the previous records kept), and --rehash; and the parse of an index the size of a 1,000-seed root.

    python tools/bench_http.py [--dir /tmp/kdcache-http-bench] [--samples 1281167] [--seeds 2] [--repeats 3]

Slab times (open + markers + 160 shard objects, each checked against the index and its marker + decode):
local disk (page cache warm); HTTP without a read-through copy; HTTP with the read-through copy empty (the
copy is written as the objects arrive); HTTP with the copy warm (no object GET, only the index). "Cold"
rows drop the page cache first (needs root; skipped otherwise).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_slab import drop_page_cache, write_simulated  # noqa: E402


def start_server(root: Path):
    proc = subprocess.Popen([sys.executable, str(HERE / "static_server.py"), str(root)], stdout=subprocess.PIPE,
                            text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"the static server did not start (it printed {url!r})")
    return proc, url


def timed_slab(where, seed: int) -> float:
    from kdcache.cache.schema import TeacherCache
    from kdcache.cache.slabs import read_slab
    t = time.perf_counter()
    slab = read_slab(TeacherCache.open(where), seed)
    assert slab.logp.shape[0] > 0
    return time.perf_counter() - t


def publish_times(root: Path) -> dict:
    from kdcache.cache.publish import PublishConfig, publish_root
    out = {}
    for name, rehash in (("first", False), ("unchanged", False), ("rehash", True)):
        t = time.perf_counter()
        s = publish_root(PublishConfig(str(root), rehash=rehash, progress=False))
        out[name] = {"seconds": time.perf_counter() - t, "hashed": s["hashed"], "reused": s["reused"],
                     "objects": s["objects"], "bytes": s["bytes"], "index_bytes": s["index_bytes"]}
    return out


def index_parse_time(objects: int) -> dict:
    """Parse time of an index listing `objects` objects (200 per seed of this cache: 40 units x (4 shards + marker))."""
    from kdcache.cache.http import parse_index
    lines = [f'"c/seeds/{i // 200:06d}/x/c/{i % 200}/0": [{1000 + i},"{i:08x}",1796520531164468741]' for i in range(objects)]
    data = ('{"format": "kdcache-published-root", "version": 1, "generation": 1, "published": "x", "objects": {\n'
            + ",\n".join(lines) + "\n}}\n").encode()
    t = time.perf_counter()
    index = parse_index(data, "bench")
    parse = time.perf_counter() - t
    t = time.perf_counter()
    index.names_in("c/seeds")
    return {"objects": objects, "bytes": len(data), "parse_s": parse, "listing_tree_s": time.perf_counter() - t}


def slab_times(cache_dir: Path, url: str, seeds: int, repeats: int, copy_dir: Path) -> dict:
    times = {"local": [], "http": [], "http_copy_empty": [], "http_copy_warm": []}
    for _ in range(repeats):
        for s in range(seeds):
            times["local"].append(timed_slab(cache_dir, s))
            os.environ.pop("KDCACHE_HTTP_CACHE", None)
            times["http"].append(timed_slab(url, s))
            shutil.rmtree(copy_dir, ignore_errors=True)
            os.environ["KDCACHE_HTTP_CACHE"] = str(copy_dir)
            times["http_copy_empty"].append(timed_slab(url, s))
            times["http_copy_warm"].append(timed_slab(url, s))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["all"] = times
    if drop_page_cache():
        out["local_cold"] = timed_slab(cache_dir, 0)
        os.environ.pop("KDCACHE_HTTP_CACHE", None)
        drop_page_cache()
        out["http_cold"] = timed_slab(url, 0)
        shutil.rmtree(copy_dir, ignore_errors=True)
        os.environ["KDCACHE_HTTP_CACHE"] = str(copy_dir)
        timed_slab(url, 0)
        drop_page_cache()
        out["http_copy_warm_cold"] = timed_slab(url, 0)
    os.environ.pop("KDCACHE_HTTP_CACHE", None)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/kdcache-http-bench")
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--index-objects", type=int, default=200_000, help="the index of a 1,000-seed root: parse time")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.unit_size = args.chunk_rows = None
    args.values_dtype, args.recipe = "uint16", "rrc"
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    root, copy_dir = base / "root", base / "read-through"
    spec, write_s = write_simulated(root / "simulated", args)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "samples": args.samples, "topk": args.topk, "seeds": args.seeds, "unit_size": spec.unit_size,
              "write_s": write_s, "publish": publish_times(root), "index": index_parse_time(args.index_objects)}
    server, url = start_server(root)
    try:
        result["slab"] = slab_times(root / "simulated", f"{url}/simulated", args.seeds, args.repeats, copy_dir)
    finally:
        server.kill()
        server.wait()
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def report(r: dict) -> None:
    pub, s, ix = r["publish"], r["slab"], r["index"]
    print(f"simulated cache: {r['samples']} samples, k={r['topk']}, {r['seeds']} seeds, units of {r['unit_size']}; "
          f"{pub['first']['objects']} objects, {pub['first']['bytes'] / 2**20:.0f} MiB; index {pub['first']['index_bytes']} bytes")
    for name, p in pub.items():
        print(f"publish ({name}): {p['seconds']:.2f} s, {p['hashed']} objects checksummed, {p['reused']} kept")
    print(f"index of {ix['objects']} objects ({ix['bytes'] / 2**20:.1f} MiB): parse {ix['parse_s']:.2f} s, "
          f"folder tree {ix['listing_tree_s']:.2f} s")
    n = len(s["all"]["local"])
    print(f"slab per seed, median of {n}: local {s['local']:.3f} s | HTTP {s['http']:.3f} s | HTTP, read-through copy "
          f"empty {s['http_copy_empty']:.3f} s | warm {s['http_copy_warm']:.3f} s")
    if "local_cold" in s:
        print(f"page cache dropped first: local {s['local_cold']:.3f} s | HTTP {s['http_cold']:.3f} s | "
              f"HTTP, copy warm {s['http_copy_warm_cold']:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
