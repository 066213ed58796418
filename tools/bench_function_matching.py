#!/usr/bin/env python
"""What function matching buys, at demo scale (real Fashion-MNIST): one student recipe, the same epochs and
the same cache size, trained four ways, two student seeds each:

  (a) cached KD, consistent mixing: the cache's views are mixed, the teacher scored the mixed images
  (b) --mix-labels: an RRC-only cache, the loader mixes the images, the target is the lambda-mix of the two
      cached distributions (FKD / ReLabel)
  (c) online KD with the same mixing (the teacher runs on the very mixed views: the reference for (a))
  (d) no teacher, the same mixing

    python tools/bench_function_matching.py --out runs/function-matching [--limit 10000] [--epochs 6]

Prints a markdown table (and writes results.json in --out). Finished steps are skipped when run again.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/function-matching"))
    p.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST samples per split")
    p.add_argument("--epochs", type=int, default=6, help="student epochs (= cached seeds)")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--student-seeds", type=int, default=2)
    p.add_argument("--aa", default="rand-m5-mstd0.5", help="RandAugment (A2 uses m7 at 224 px; milder at 32 px)")
    p.add_argument("--mixup", type=float, default=0.2)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from kdcache.cli import run as kd   # one command in this process: imports and compiled code shared
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, teacher = out / "data", out / "teacher"
    seeds = f"0:{args.epochs}"
    mixing = ["--mixup", args.mixup, "--cutmix", args.cutmix]
    views = ["--aa", args.aa, *mixing, "--scale", 0.35, 1.0]
    dev = ["--device", args.device]
    t0 = time.time()
    if not (data / "manifest.json").exists():
        kd("prepare", "fashion-mnist", "--limit", args.limit, "--out", data)
    if not (teacher / "summary.json").exists():
        kd("train-student", "--data", data, "--kd", "none", "--model", "resnet10t", "--epochs", args.teacher_epochs,
           "--batch-size", 128, "--lr", 0.1, "--smoothing", 0.1, "--scale", 0.35, 1.0, "--eval-every",
           args.teacher_epochs, "--out", teacher, "--no-progress", *dev)
    weights = ["--teacher", "resnet10t", "--teacher-checkpoint", teacher / "model.safetensors"]
    caches = {"mixed": out / "cache-mixed", "rrc": out / "cache-rrc"}
    for name, extra in (("mixed", views), ("rrc", ["--aa", args.aa, "--scale", 0.35, 1.0])):
        kd("dump-teacher", "--data", data, "--out", caches[name], "--seeds", seeds, "--topk", 10, *weights,
           "--no-progress", *dev, *extra)
    student = ["--data", data, "--model", "test_resnet", "--epochs", args.epochs, "--batch-size", 128, "--lr", 0.1,
               "--hard-loss", "ce", "--eval-every", args.epochs, "--no-progress", *dev]
    ways = {
        "a_cached_function_matching": ["--cache", caches["mixed"]],
        "b_mix_labels": ["--cache", caches["rrc"], "--mix-labels", *mixing],
        "c_online_kd": ["--kd", "online", *weights, "--view-seeds", seeds, *views],
        "d_no_teacher": ["--kd", "none", "--view-seeds", seeds, *views],
    }
    results = {}
    for way, extra in ways.items():
        for seed in range(args.student_seeds):
            run = out / way / f"seed{seed}"
            if not (run / "summary.json").exists():
                kd("train-student", *student, *extra, "--seed", seed, "--out", run)
            results.setdefault(way, []).append(json.loads((run / "summary.json").read_text()))
    rows = []
    for way, runs in results.items():
        top1 = [r["final_top1"] for r in runs]
        rows.append({"way": way, "top1": top1, "mean": statistics.mean(top1),
                     "epoch_s": statistics.median(r["epoch_time_s"] for r in runs)})
    teacher_top1 = json.loads((teacher / "summary.json").read_text())["final_top1"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "args": {k: str(v) for k, v in vars(args).items()}, "teacher_top1": teacher_top1, "rows": rows,
              "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\nteacher resnet10t: {teacher_top1:.2f} %; students test_resnet, {args.epochs} epochs, {args.limit} samples, "
          f"views {' '.join(map(str, views))}")
    print("| way | val top-1 per seed (%) | mean | s/epoch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {', '.join(f'{t:.2f}' for t in r['top1'])} | {r['mean']:.2f} | {r['epoch_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
