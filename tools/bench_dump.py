#!/usr/bin/env python
"""Benchmark of dump-teacher, in one run on one device:
  1. dump throughput (views/s, img/s) vs the bare teacher forward on already-rendered views
     (same teacher, batch size, device, AMP): the goal is dump >= 0.9 x bare forward; and the dump's
     renderer alone (its chunks and threads, no teacher): the most the dump can reach on a fast device;
  2. decode + render time per view with S = 1, 4, 16 views rendered from each decoded image;
  3. bytes per view on disk for k = 5, 10, 20.

The whole train split of --data is dumped (prepare one with --limit for a quick run).

    kdcache prepare fashion-mnist --limit 4096 --out data/fm4096
    python tools/bench_dump.py --data data/fm4096 --teacher resnet10t                   # CPU, 32 px
    python tools/bench_dump.py --data data/synthetic-imagenet --teacher resnet50 --device cuda --batch-size 256
    python tools/bench_dump.py --data data/fm4096 --a2        # VanillaKD's A2 views: RandAugment + mixup/cutmix

Bytes per view at k = 10 with 1000 classes (a teacher this benchmark cannot have offline): tools/bench_slab.py.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset")
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seeds", type=int, default=4, help="views per image in the throughput run")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-bytes", action="store_true", help="skip part 3 (bytes per view)")
    p.add_argument("--a2", action="store_true", help="A2 views: RandAugment rand-m7-mstd0.5, mixup 0.1, cutmix 1.0")
    p.add_argument("--renderer", type=int, default=None, help="renderer version of the views (default: the current one)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from kdcache.augment import ParamLayout, ViewRecipe, view_params
    from kdcache.augment.render import SampleBuffers, render_samples
    from kdcache.cache.schema import TeacherCache
    from kdcache.data.dataset import PreparedDataset
    from kdcache.dist import DistContext, resolve_device
    from kdcache.models import ModelSpec, build_model
    from kdcache.teacher.dump import DumpConfig, TeacherRunner, dump_teacher

    ds = PreparedDataset.open(args.data)
    split = ds.split("train")
    device = resolve_device(args.device, DistContext())
    recipe = ViewRecipe(size=ds.view_size, **(dict(aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, mix_block=64)
                                              if args.a2 else {}), **({"renderer": args.renderer} if args.renderer else {}))
    tmp = Path(tempfile.mkdtemp(prefix="bench_dump_"))
    sub = ds
    n = split.num_samples
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
               "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
               "teacher": args.teacher, "size": recipe.size, "batch_size": args.batch_size, "samples": n,
               "seeds": args.seeds, "recipe": recipe.summary()}

    spec = ModelSpec(name=args.teacher, random_init=True)
    model, info = build_model(spec, sub.num_classes, what="teacher")
    runner = TeacherRunner(model, info, device, args.amp, args.compile, topk=10)
    results["amp"] = runner.amp

    # 1a. bare forward on pre-rendered views (the same views the dump renders)
    idx = np.arange(min(n, max(64, 32 * args.batch_size // args.seeds)))
    params = np.stack([view_params(recipe, 0, s, idx, split.sizes[idx, 0], split.sizes[idx, 1], n)
                       for s in range(args.seeds)], 1)
    reader = split.jpeg_reader()
    layout = ParamLayout.of(recipe)
    views = render_samples([reader[i] for i in idx], split.sizes[idx, 0], split.sizes[idx, 1], params, recipe.size, layout)
    views = views.reshape(-1, recipe.size, recipe.size, 3)
    if device.type == "cuda":  # pinned, as the dump's render buffers: asynchronous host -> device copies
        views = torch.from_numpy(views).pin_memory().numpy()
    batches = [views[j:j + args.batch_size] for j in range(0, len(views) - args.batch_size + 1, args.batch_size)]
    for b in batches[:2]:
        runner.topk_outputs(b)
    rates = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        pending = None
        for b in batches:  # one batch in flight and the device -> host copy of top-k, as the dump does
            launched = runner.launch(b)
            if pending is not None:
                pending.get()
            pending = launched
        pending.get()
        rates.append(len(batches) * args.batch_size / (time.perf_counter() - t))
    bare = statistics.median(rates)

    # 1b. the dump's renderer alone: its producer's chunks over the whole split, same threads, no teacher (on a GPU
    # the dump can only reach the forward's rate if this is faster)
    from concurrent.futures import ThreadPoolExecutor
    import numba
    from kdcache.teacher.dump import (OutputRing, batches_per_render, default_render_threads, queue_depth,
                                      render_chunks, ring_slots, samples_per_batch)
    workers = args.workers or default_render_threads(device)
    numba.set_num_threads(workers)
    all_params = np.stack([view_params(recipe, 0, s, np.arange(n), split.sizes[:, 0], split.sizes[:, 1], n)
                           for s in range(args.seeds)], 1)
    per_batch = samples_per_batch(args.batch_size, args.seeds, recipe)
    ring = OutputRing(ring_slots(queue_depth(batches_per_render(per_batch, args.seeds, workers))),
                      pinned=device.type == "cuda")
    buffers = SampleBuffers()
    render_rates = []
    with ThreadPoolExecutor(1) as read_ahead:
        for _ in range(3):
            t = time.perf_counter()
            for _chunk in render_chunks(reader, read_ahead, split, recipe, all_params, 0, n, per_batch, workers,
                                        ring, buffers):
                pass
            render_rates.append(n * args.seeds / (time.perf_counter() - t))
    render_alone = max(render_rates)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    # 1c. the dump itself (a warm-up dump first: JIT of the renderer, cudnn autotune)
    def run_dump(out, seeds, topk=10):
        cfg = DumpConfig(data=sub.root, out=out, seeds=seeds, topk=topk, teacher=spec, recipe=recipe,
                         batch_size=args.batch_size, device=str(device), amp=args.amp, compile=args.compile,
                         workers=args.workers, progress=False)
        return dump_teacher(cfg)
    run_dump(tmp / "warm", [1000])
    dumped = run_dump(tmp / "timed", list(range(args.seeds)))
    results["bare_forward_views_per_s"] = bare
    results["dump_views_per_s"] = dumped["views_per_s"]
    results["dump_img_per_s"] = dumped["img_per_s"]
    results["dump_over_bare"] = dumped["views_per_s"] / bare
    results["render_alone_views_per_s"] = render_alone
    results["render_threads"] = workers

    # 2. decode + render time per view, S views from each decoded image
    # (buffers reused across calls, as the dump does: the first call touches their pages)
    per_view = {}
    m = min(n, 64)
    jpegs = [reader[i] for i in range(m)]
    scratch = SampleBuffers()
    for S in (1, 4, 16):
        prm = np.stack([view_params(recipe, 0, s, np.arange(m), split.sizes[:m, 0], split.sizes[:m, 1], n)
                        for s in range(S)], 1)
        out = np.empty((m, S, recipe.size, recipe.size, 3), np.uint8)
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            render_samples(jpegs, split.sizes[:m, 0], split.sizes[:m, 1], prm, recipe.size, layout, out=out,
                           buffers=scratch, mix=False)
            best = min(best, time.perf_counter() - t)
        per_view[S] = best / (m * S) * 1e6
    results["decode_render_us_per_view"] = per_view

    # 3. bytes per view on disk (two seeds each)
    bpv = {}
    for k in (5, 10, 20):
        if k > sub.num_classes or args.skip_bytes:
            continue
        run_dump(tmp / f"k{k}", [0, 1], topk=k)
        c = TeacherCache.open(tmp / f"k{k}")
        bpv[k] = {"on_disk": c.summary()["bytes_per_view"], "raw": c.raw_bytes_per_view()}
    results["bytes_per_view"] = bpv
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ndump-teacher benchmark: {args.teacher} at {recipe.size}px ({recipe.summary()}), batch {args.batch_size}, "
          f"{results['device']}, amp {results['amp']}, {n} samples x {args.seeds} seeds")
    print(f"| | views/s |\n|---|---|\n| bare teacher forward (pre-rendered) | {bare:,.0f} |\n"
          f"| the dump's renderer alone ({workers} threads, no teacher) | {render_alone:,.0f} |\n"
          f"| dump-teacher (read, decode, render, forward, write) | {dumped['views_per_s']:,.0f} |")
    print(f"dump / bare forward = {results['dump_over_bare']:.2f} (goal >= 0.9); dump img/s = {dumped['img_per_s']:,.0f}")
    print("decode + render per view: " + ", ".join(f"S={S}: {us:.1f} us" for S, us in per_view.items()))
    print("bytes per view: " + ", ".join(f"k={k}: {v['on_disk']:.1f} on disk ({v['raw']} raw)" for k, v in bpv.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
