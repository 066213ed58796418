#!/usr/bin/env python
"""Progressive resizing from one cache (issue 11), at demo scale (real Fashion-MNIST, 32-px views): the same
cached-KD student recipe and epochs trained at a fixed 32 px and with FFCV's ramp (START px, then END px from
the ramp's end, ffcv-imagenet's default ramp epochs), side by side; every student evaluated at 32 px.

    python tools/bench_progressive.py --out runs/progressive [--data DIR] [--limit 4096] [--epochs 8]

The teacher (resnet10t, --kd none) and the cache (one seed per student epoch, k = 10: lossless here) are made
once in --out and reused; finished students are skipped when run again. Prints a markdown table (also
results.json in --out).

Wall-clock times on a shared 2-core machine swing with the neighbours' load (the calibration step moved from
87 ms to 1.4 s within minutes while this was written), so the table also gives the CPU time the run used
(this process, all threads: waiting for a time slice does not count) and a model-compute estimate: the
student's train step timed at each size in interleaved rounds (CPU time, the fastest), summed over the
schedule's steps.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def step_ms(model_name: str, sizes, batch: int = 128, rounds: int = 8, steps: int = 2) -> dict:
    """The fastest CPU ms (all threads) of one train step (forward, backward, SGD; channels_last as train-student) per size, the
    sizes interleaved round by round so that a quiet moment is met by all of them."""
    import timm
    import torch
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    times = {s: [] for s in sizes}
    for r in range(rounds + 1):
        for size in sizes:
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            for _ in range(steps):
                t = time.process_time()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if r:   # round 0 warms up
                    times[size].append(1000 * (time.process_time() - t))
    return {s: min(v) for s, v in times.items()}


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
    from kdcache.cli import run as kd   # one command in this process: imports and compiled code shared
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
            t, cpu = time.time(), time.process_time()
            kd("train-student", "--data", data, "--cache", cache, "--model", args.model, "--epochs", args.epochs,
               "--batch-size", 128, "--lr", 0.1, "--hard-loss", "ce", "--eval-every", args.epochs, "--size", size,
               "--size-step", args.size_step, "--out", run, "--no-progress", *dev)
            (run / "wall.json").write_text(json.dumps({"wall_s": time.time() - t, "cpu_s": time.process_time() - cpu}))
        s = json.loads((run / "summary.json").read_text())
        epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
        rows.append({"size": size, "sizes": s["size_schedule"]["sizes"], "top1": s["final_top1"],
                     "train_s": sum(r["seconds"] for r in epochs), "val_res": s["val_res"],
                     **json.loads((run / "wall.json").read_text())})
    ms = step_ms(args.model, sorted({s for r in rows for s in r["sizes"]}))
    steps = json.loads((out / f"size-{rows[0]['size'].replace(':', '-')}" / "summary.json").read_text())["steps"]
    for r in rows:   # the schedule's model compute: steps per epoch x ms per step at the epoch's size
        r["compute_s"] = sum(ms[s] for s in r["sizes"]) * steps / args.epochs / 1000
    teacher_top1 = json.loads((teacher / "summary.json").read_text())["final_top1"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "args": {k: str(v) for k, v in vars(args).items()}, "teacher_top1": teacher_top1, "rows": rows,
              "step_ms": ms, "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\nteacher resnet10t: {teacher_top1:.2f} %; students {args.model}, cached KD, {args.epochs} epochs, "
          f"views 32 px {' '.join(map(str, views))}, val at {rows[0]['val_res']} px")
    print("student train step, batch 128 (CPU ms, fastest of interleaved rounds): "
          + ", ".join(f"{s} px {v:.1f}" for s, v in ms.items()))
    base, cbase = rows[0]["train_s"], rows[0]["compute_s"]
    ubase = rows[0]["cpu_s"]
    print("| --size | size per epoch | val top-1 (%) | training s (sum of epochs) | vs first | run wall s (with eval, "
          "compile) | run CPU s | vs first | model compute CPU s (est.) | vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {' '.join(map(str, r['sizes']))} | {r['top1']:.2f} | {r['train_s']:.1f} | "
              f"{r['train_s'] / base:.2f}x | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s'] / ubase:.2f}x | "
              f"{r['compute_s']:.1f} | {r['compute_s'] / cbase:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
