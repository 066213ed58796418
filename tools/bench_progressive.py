#!/usr/bin/env python
"""Progressive resizing from one cache (issue 11), at demo scale (real Fashion-MNIST, 32-px views): the same
cached-KD student recipe and epochs trained at a fixed 32 px and with FFCV's ramp (START px, then END px from
the ramp's end, ffcv-imagenet's default ramp epochs), side by side; every student evaluated at 32 px.

    python tools/bench_progressive.py --out runs/progressive [--data DIR] [--limit 4096] [--epochs 8]

The teacher (resnet10t, --kd none) and the cache (one seed per student epoch, k = 10: lossless here) are made
once in --out and reused; finished students are skipped when run again. Prints a markdown table (also
results.json in --out).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def kd(*args):
    """One kdcache command in this process (imports shared between steps)."""
    from kdcache.cli import main
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"kdcache {' '.join(map(str, args))} exited {exc.code}") from None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/progressive"))
    p.add_argument("--data", type=Path, default=None, help="a prepared Fashion-MNIST (default: prepare --limit)")
    p.add_argument("--limit", type=int, default=4096, help="Fashion-MNIST samples per split, when preparing")
    p.add_argument("--epochs", type=int, default=8, help="student epochs (= cached seeds)")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--model", default="resnet10t", help="the student (its compute is what a smaller size saves)")
    p.add_argument("--sizes", default="32,24:32,16:32", help="comma-separated --size values (32 = fixed)")
    p.add_argument("--size-step", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or out / "data"
    teacher, cache = out / "teacher", out / "cache"
    views = ["--scale", 0.35, 1.0]
    dev = ["--device", args.device]
    t0 = time.time()
    if not (Path(data) / "manifest.json").exists():
        kd("prepare", "fashion-mnist", "--limit", args.limit, "--out", data)
    if not (teacher / "summary.json").exists():
        kd("train-student", "--data", data, "--kd", "none", "--model", "resnet10t", "--epochs", args.teacher_epochs,
           "--batch-size", 128, "--lr", 0.1, "--smoothing", 0.1, *views, "--eval-every", args.teacher_epochs,
           "--out", teacher, "--no-progress", *dev)
    if not (cache / "zarr.json").exists() or not (out / "cache.done").exists():
        kd("dump-teacher", "--data", data, "--out", cache, "--seeds", f"0:{args.epochs}", "--topk", 10, "--teacher",
           "resnet10t", "--teacher-checkpoint", teacher / "model.safetensors", "--no-progress", *views, *dev)
        (out / "cache.done").write_text("")
    rows = []
    for size in args.sizes.split(","):
        run = out / f"size-{size.replace(':', '-')}"
        if not (run / "summary.json").exists():
            t = time.time()
            kd("train-student", "--data", data, "--cache", cache, "--model", args.model, "--epochs", args.epochs,
               "--batch-size", 128, "--lr", 0.1, "--hard-loss", "ce", "--eval-every", args.epochs, "--size", size,
               "--size-step", args.size_step, "--out", run, "--no-progress", *dev)
            (run / "wall.json").write_text(json.dumps({"wall_s": time.time() - t}))
        s = json.loads((run / "summary.json").read_text())
        epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
        rows.append({"size": size, "sizes": s["size_schedule"]["sizes"], "top1": s["final_top1"],
                     "train_s": sum(r["seconds"] for r in epochs), "wall_s": json.loads((run / "wall.json").read_text())["wall_s"],
                     "val_res": s["val_res"]})
    teacher_top1 = json.loads((teacher / "summary.json").read_text())["final_top1"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "args": {k: str(v) for k, v in vars(args).items()}, "teacher_top1": teacher_top1, "rows": rows,
              "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\nteacher resnet10t: {teacher_top1:.2f} %; students {args.model}, cached KD, {args.epochs} epochs, "
          f"views 32 px {' '.join(map(str, views))}, val at {rows[0]['val_res']} px")
    base = rows[0]["train_s"]
    print("| --size | size per epoch | val top-1 (%) | training s (sum of epochs) | vs first | run s (with eval, compile) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {' '.join(map(str, r['sizes']))} | {r['top1']:.2f} | {r['train_s']:.1f} | "
              f"{r['train_s'] / base:.2f}x | {r['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
