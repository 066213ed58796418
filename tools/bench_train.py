#!/usr/bin/env python
"""Benchmark of train-student: epoch time of the same student, loader and views, trained
  none   (plain supervised),
  cache  (cached KD: soft labels from a dump-teacher cache),
  online (the teacher in the loop on the same views),
in one run, modes interleaved round by round so that machine noise hits all alike. The first epoch of
every training run (FFCV/numba JIT, cudnn autotune) is not timed. Goals: cache/none <= 1.03, and
online/cache >= 0.95 x (1 + teacher forward time / cached epoch time), both measured here. With
--second-teacher NAME, a second teacher is dumped over the cache's views (dump-teacher --add-teacher) and a
fourth mode, cache2 (--teachers both --ensemble mean), is timed too: goal cache2/none <= 1.03.

    kdcache prepare fashion-mnist --limit 8192 --out data/fm8192
    python tools/bench_train.py --data data/fm8192 --student resnet10t --teacher resnet18          # CPU
    python tools/bench_train.py --data data/fm8192 --second-teacher resnet18 --modes none,cache,cache2   # two teachers
    python tools/bench_train.py --data data/synthetic-imagenet --student resnet50 --teacher resnet152 --device cuda
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

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--student", default="resnet10t")
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3, help="epochs per training run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="training runs per mode, interleaved")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--second-teacher", default=None, help="also time cached KD from two teachers (mean)")
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of none,cache,online,cache2 to time (default: all)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import safetensors.torch
    from kdcache.data.dataset import PreparedDataset
    from kdcache.models import ModelSpec, build_model
    from kdcache.student.report import MetricsLog
    from kdcache.student.train import TrainConfig, train_student
    from kdcache.teacher.dump import DumpConfig, dump_teacher

    ds = PreparedDataset.open(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    teacher, info = build_model(ModelSpec(name=args.teacher, random_init=True), ds.num_classes, what="teacher")
    weights = tmp / "teacher.safetensors"
    safetensors.torch.save_file(teacher.state_dict(), str(weights))
    spec = ModelSpec(name=args.teacher, checkpoint=str(weights))
    seeds = list(range(args.epochs))
    topk = min(args.topk, ds.num_classes)
    t = time.time()
    dump_teacher(DumpConfig(data=ds.root, out=tmp / "cache", seeds=seeds, topk=topk, teacher=spec, device=args.device,
                            amp=args.amp, batch_size=args.batch_size, workers=args.workers, progress=False))
    dump_s = time.time() - t
    teachers = None
    if args.second_teacher:
        second, _ = build_model(ModelSpec(name=args.second_teacher, random_init=True, seed=1), ds.num_classes,
                                what="teacher")
        weights2 = tmp / "teacher2.safetensors"
        safetensors.torch.save_file(second.state_dict(), str(weights2))
        dump_teacher(DumpConfig(data=ds.root, out=tmp / "cache", seeds=seeds, topk=topk, add_teacher=True,
                                teacher_label="second", teacher=ModelSpec(name=args.second_teacher,
                                                                          checkpoint=str(weights2)),
                                device=args.device, amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                                progress=False))
        teachers = [args.teacher, "second"]

    def cfg(mode, run):
        return TrainConfig(data=str(ds.root), out=str(tmp / run), model=args.student, epochs=args.epochs,
                           mode="cache" if mode == "cache2" else mode,   # cache2: cached KD, two teachers
                           cache=str(tmp / "cache") if mode.startswith("cache") else None,
                           teachers=teachers if mode == "cache2" else None,
                           teacher={"name": args.teacher, "checkpoint": str(weights)} if mode == "online" else None,
                           batch_size=args.batch_size, device=args.device, amp=args.amp, workers=args.workers,
                           compile=args.compile, view_seeds=seeds, eval_every=10 ** 6, progress=False, lr=0.01)

    times = {"none": [], "cache": [], "online": [], **({"cache2": []} if teachers else {})}
    if args.modes:
        wanted = args.modes.split(",")
        unknown = set(wanted) - set(times)
        if unknown or "none" not in wanted:
            p.error(f"--modes {args.modes}: choose from {','.join(times)}, with none (the ratios' base)")
        times = {m: [] for m in times if m in wanted}
    teacher_s = []
    for r in range(args.rounds):
        for mode in times:
            summary = train_student(cfg(mode, f"{mode}-{r}"))
            hist = MetricsLog(tmp / f"{mode}-{r}" / "metrics.jsonl").records()
            epochs = [h for h in hist if h["kind"] == "epoch"][1:]
            times[mode] += [h["seconds"] for h in epochs]
            if mode == "online":
                teacher_s += [h["teacher_seconds"] for h in epochs]
            print(f"round {r + 1} {mode}: " + ", ".join(f"{h['seconds']:.2f} s" for h in epochs), file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    t_teacher = statistics.median(teacher_s) if teacher_s else None
    predicted = 1 + t_teacher / med["cache"] if teacher_s and "cache" in med else None
    dev = summary["device"]
    results = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": dev + (f" ({torch.cuda.get_device_name(0)})" if dev.startswith("cuda") else ""), "amp": summary["amp"],
        "student": args.student, "teacher": args.teacher, "samples": ds.split("train").num_samples,
        "size": ds.view_size, "batch_size": args.batch_size, "epoch_s": med, "epoch_s_all": times,
        "teacher_forward_s_per_epoch": t_teacher,
        "img_per_s": {m: ds.split("train").num_samples // args.batch_size * args.batch_size / v for m, v in med.items()},
        "cache_over_none": med["cache"] / med["none"] if "cache" in med else None,
        "online_over_cache": med["online"] / med["cache"] if predicted else None,
        "online_over_cache_predicted": predicted, "dump_seconds": dump_s,
    }
    if "cache2" in med:
        results["cache2_over_none"] = med["cache2"] / med["none"]
    n = results["samples"]
    print(f"\ntrain-student benchmark: student {args.student}, teacher {args.teacher}, {n} samples at {ds.view_size}px, "
          f"batch {args.batch_size}, {results['device']}, amp {results['amp']}; median of {len(times['none'])} timed epochs")
    print("| mode | epoch (s) | img/s |\n|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v:.2f} | {n // args.batch_size * args.batch_size / v:,.0f} |")
    if "cache" in med:
        print(f"\ncache / none = {results['cache_over_none']:.3f} (goal <= 1.03)")
    if "cache2" in med:
        print(f"cache2 (two teachers, mean) / none = {results['cache2_over_none']:.3f} (goal <= 1.03)")
    if predicted:
        print(f"online / cache = {results['online_over_cache']:.2f}; 1 + teacher forward / cached epoch = {predicted:.2f} "
              f"(teacher forward {t_teacher:.2f} s/epoch); goal: measured >= 0.95 x predicted = {0.95 * predicted:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
