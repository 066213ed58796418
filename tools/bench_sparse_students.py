#!/usr/bin/env python
"""Does a small k lose what the teacher knows, and do sampled targets get it back? At demo scale (real
Fashion-MNIST, 10 classes), one student recipe distilled at T = 4 from four caches of the same teacher and
views, two student seeds each:

  full       k = 10 = C: the teacher's whole distribution (targets 4 + 4 k = 44 B per view)
  top-2      k = 2 with the uniform tail (derived exactly from the full cache: kdcache derive --topk 2)
  sampled    k - 1 exact + m = 1 draw from the tail at Td = T (dump-teacher --targets sampled): the same bytes
             per view as top-k (4 + 4 (k + m) = 12 B at k = 2); --exact E: E exact + k - E draws
  sampled-cv the same exact classes and draws with the median control variate (--targets sampled-cv): 8 B
             more per view (log beta, log A), so 1 + 1 costs what top-4 and sampled 1 + 3 cost
  none       no teacher (the same views): the floor

Students learn from the teacher alone (--hard-loss none): the target is the whole signal, so what a cache loses
shows. Every run uses the same views, initialisation and sample order per seed.

    python tools/bench_sparse_students.py --out runs/sparse-students [--limit 10000] [--epochs 3]
    python tools/bench_sparse_students.py --out runs/sparse-students --topk 4 --exact 1   # top-4 vs 1 + 3 draws

Prints a markdown table and writes results-top<k>-<exact>p<draws>.json in --out. Finished steps are skipped when run again.
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
    p.add_argument("--out", type=Path, default=Path("runs/sparse-students"))
    p.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST training samples")
    p.add_argument("--epochs", type=int, default=3, help="student epochs (= cached seeds)")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--topk", type=int, default=2, help="the small k")
    p.add_argument("--exact", type=int, default=None,
                   help="exact classes of the sampled cache (default k - 1); the other k - exact columns are draws")
    p.add_argument("--student-seeds", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    from kdcache.cli import run as kd   # one command in this process: imports and compiled code shared
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, teacher = out / "data", out / "teacher"
    seeds, views, dev = f"0:{args.epochs}", ["--scale", 0.35, 1.0], ["--device", args.device]
    t0 = time.time()
    if not (data / "manifest.json").exists():
        kd("prepare", "fashion-mnist", "--limit", args.limit, "--out", data)
    if not (teacher / "summary.json").exists():   # the demo's teacher recipe
        kd("train-student", "--data", data, "--kd", "none", "--model", "resnet10t", "--epochs", args.teacher_epochs,
           "--batch-size", 64, "--lr", 0.1, "--smoothing", 0.1, *views, "--eval-every", args.teacher_epochs,
           "--out", teacher, "--no-progress", *dev)
    weights = ["--teacher", "resnet10t", "--teacher-checkpoint", teacher / "model.safetensors"]
    dump = ["dump-teacher", "--data", data, "--seeds", seeds, *weights, *views, "--no-progress", *dev]
    exact = args.topk - 1 if args.exact is None else args.exact
    draws = args.topk - exact
    if not 1 <= exact < args.topk:
        p.error(f"--exact {exact}: must be in 1..{args.topk - 1}")
    full, small, sampled = out / "cache-full", out / f"cache-top{args.topk}", out / f"cache-sampled-{exact}p{draws}"
    controlled = out / f"cache-sampled-cv-{exact}p{draws}"
    kd(*dump, "--out", full, "--topk", 10)
    kd("derive", full, small, "--topk", args.topk, "--no-progress")
    # equal bytes: k + m columns = the small k's
    kd(*dump, "--out", sampled, "--targets", "sampled", "--topk", exact, "--samples", draws,
       "--sample-temperature", args.temperature)
    kd(*dump, "--out", controlled, "--targets", "sampled-cv", "--topk", exact, "--samples", draws,
       "--sample-temperature", args.temperature)
    student = ["--data", data, "--model", "test_resnet", "--epochs", args.epochs, "--batch-size", 64, "--lr", 0.1,
               "--temperature", args.temperature, "--hard-loss", "none", "--eval-every", args.epochs,
               "--no-progress", *dev]
    ways = {"full": ["--cache", full], f"top-{args.topk}": ["--cache", small],
            f"sampled {exact}+{draws}": ["--cache", sampled], f"sampled-cv {exact}+{draws}": ["--cache", controlled],
            "none": ["--kd", "none", "--view-seeds", seeds, *views]}
    results = {}
    for way, extra in ways.items():
        for seed in range(args.student_seeds):
            run = out / "students" / way.replace(" ", "_").replace("+", "p") / f"seed{seed}"   # sampled-cv_1p1
            if not (run / "summary.json").exists():
                kd("train-student", *student, *extra, "--seed", seed, "--out", run)
            results.setdefault(way, []).append(json.loads((run / "summary.json").read_text()))
    sizes = {way: _bytes_per_view(extra[1]) for way, extra in ways.items() if extra[0] == "--cache"}
    rows = []
    for way, runs in results.items():
        top1 = [r["final_top1"] for r in runs]
        rows.append({"way": way, "top1": top1, "mean": statistics.mean(top1), "spread": max(top1) - min(top1),
                     "raw_bytes_per_view": sizes.get(way), "epoch_s": statistics.median(r["epoch_time_s"] for r in runs)})
    teacher_top1 = json.loads((teacher / "summary.json").read_text())["final_top1"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "args": {k: str(v) for k, v in vars(args).items()}, "teacher_top1": teacher_top1, "rows": rows,
              "seconds": time.time() - t0}
    (out / f"results-top{args.topk}-{exact}p{draws}.json").write_text(json.dumps(report, indent=1))
    print(f"\nteacher resnet10t: {teacher_top1:.2f} %; students test_resnet, {args.epochs} epochs, {args.limit} samples, "
          f"KD only at T = {args.temperature:g}")
    print("| targets | stored bytes per view (targets + params) | val top-1 per seed (%) | mean | spread |\n|---|---|---|---|---|")
    for r in rows:
        b = "-" if r["raw_bytes_per_view"] is None else r["raw_bytes_per_view"]
        print(f"| {r['way']} | {b} | {', '.join(f'{t:.2f}' for t in r['top1'])} | {r['mean']:.2f} | {r['spread']:.2f} |")
    return 0


def _bytes_per_view(cache) -> int:
    from kdcache.cache.schema import TeacherCache
    return TeacherCache.open(cache).raw_bytes_per_view()


if __name__ == "__main__":
    sys.exit(main())
