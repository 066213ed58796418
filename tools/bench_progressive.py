#!/usr/bin/env python
"""Progressive resizing from one cache (issue 11), at demo scale (real Fashion-MNIST, 32-px views): the same
cached-KD student recipe and epochs trained at a fixed 32 px and with FFCV's ramp (START px, then END px from
the ramp's end, ffcv-imagenet's default ramp epochs), side by side; every student evaluated at 32 px.

    python tools/bench_progressive.py --out runs/progressive [--data DIR] [--limit 4096] [--epochs 8]
    python tools/bench_progressive.py --out runs/prog18 --limit 1438 --epochs 16 --teacher-epochs 8 \
        --model test_resnet --sizes 32,16:32 --seeds 0,1 --variant "--size 16:32 --ramp-start 6 --ramp-end 8" \
        --no-step-ms --diagnose                                                   # issue 18

The teacher (resnet10t, --kd none) and the cache (one seed per student epoch, k = 10: lossless here) are made
once in --out and reused; finished students are skipped when run again. Each student (a --sizes value or a
--variant's train-student arguments) is trained once per --seeds seed. Prints a markdown table (also
results.json in --out).

--diagnose (issue 18) adds a second table: each student evaluated at --eval-sizes, and at its last size again
after its BN statistics were re-estimated there (precise BN, --bn-images views of its last epoch, weights
unchanged), next to the steps it trained at its last size, the learning rate there and its share of the sum.

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
import shlex
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


def _run_name(variant, seed: int) -> str:
    """size-16-32 (the --sizes students, seed 0, as before), else the arguments made a folder name."""
    name = "-".join(str(a).lstrip("-") for a in variant).replace(":", "-").replace("/", "-")
    return name + (f"-seed{seed}" if seed else "")


def _runs(sizes) -> str:
    """[16, 16, 24, 32, 32] -> '16 x2, 24, 32 x2'."""
    out, i = [], 0
    while i < len(sizes):
        j = i
        while j < len(sizes) and sizes[j] == sizes[i]:
            j += 1
        out.append(f"{sizes[i]}" + (f" x{j - i}" if j - i > 1 else ""))
        i = j
    return ", ".join(out)


def student(kd, run: Path, data, cache, args, variant, seed: int, dev) -> dict:
    """Train (unless done) one cached-KD student: the common recipe plus `variant`; its row of the table."""
    if not (run / "summary.json").exists():
        step = [] if "--size-step" in variant else ["--size-step", args.size_step]
        t, cpu = time.time(), time.process_time()
        kd("train-student", "--data", data, "--cache", cache, "--model", args.model, "--epochs", args.epochs,
           "--batch-size", args.batch_size, "--lr", 0.1, "--hard-loss", "ce", "--eval-every", args.epochs,
           "--seed", seed, *step, *variant, "--out", run, "--no-progress", *dev)
        (run / "wall.json").write_text(json.dumps({"wall_s": time.time() - t, "cpu_s": time.process_time() - cpu}))
    s = json.loads((run / "summary.json").read_text())
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    return {"student": " ".join(map(str, variant)), "seed": seed, "run": str(run), "sizes": s["size_schedule"]["sizes"],
            "top1": s["final_top1"], "steps": s["steps"], "train_s": sum(r["seconds"] for r in epochs),
            "val_res": s["val_res"], **json.loads((run / "wall.json").read_text())}


def final_size(run: Path) -> dict:
    """summary.json's final_size (steps, learning rate and its share at the last size), or for a run made before
    it was recorded the same computed from its config (kdcache.student.resolution.final_size_training)."""
    from kdcache.student.resolution import SizeSchedule, final_size_training
    from kdcache.student.train import TrainConfig, _lr_curve
    summary = json.loads((run / "summary.json").read_text())
    if "final_size" in summary:
        return summary["final_size"]
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    schedule = SizeSchedule(**{k: v for k, v in summary["size_schedule"].items() if k != "sizes"})
    per_epoch = summary["steps"] // cfg.epochs
    return final_size_training(schedule, per_epoch, _lr_curve(cfg, cfg.lr or 0.1, per_epoch))


def recompute_bn_stats(model, batches, normalize, images: int) -> int:
    """Precise BN (Wu & Johnson 2021; torch.optim.swa_utils.update_bn): every BN layer's running mean and
    variance replaced by the plain average over whole batches of `batches` (uint8 NCHW) holding at least
    `images` images, forwarded in train mode without gradients; the weights unchanged. Returns the images used."""
    import torch
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None            # cumulative average over the batches
    model.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(normalize(x).contiguous(memory_format=torch.channels_last))
            seen += x.shape[0]
            if seen >= images:
                break
    for bn in layers:
        bn.momentum = 0.1
    model.eval()
    return seen


def diagnose(run: Path, data, cache, eval_sizes, bn_images: int, workers=None) -> dict:
    """The trained student (model.safetensors) evaluated on val at each of `eval_sizes`, then again at the last
    training size after its BN statistics were re-estimated there (recompute_bn_stats, `bn_images`
    training views of the run's last epoch rendered at that size, weights unchanged)."""
    import torch
    from kdcache.augment.loader import ReplayLoader, eval_loader
    from kdcache.augment.params import ParamLayout
    from kdcache.augment.recipe import ViewRecipe
    from kdcache.cache.schema import TeacherCache
    from kdcache.cache.slabs import read_slab
    from kdcache.data.dataset import PreparedDataset
    from kdcache.models import IMAGENET_MEAN, IMAGENET_STD, Normalize, create_timm_model
    from kdcache.student.evaluate import evaluate
    from kdcache.weights import load_into, read_state_dict
    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    ds = PreparedDataset.open(data)
    model = create_timm_model(cfg["model"], ds.num_classes)
    load_into(model, read_state_dict(run / "model.safetensors"), run, cfg["model"])
    normalize = Normalize(model.pretrained_cfg.get("mean", IMAGENET_MEAN), model.pretrained_cfg.get("std", IMAGENET_STD))
    model = model.to(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    val = ds.split("val").beton_path
    out = {f"top1@{s}": evaluate(model, eval_loader(val, s, 256, workers, crop_ratio=cfg["crop_pct"]), normalize, cpu)["top1"]
           for s in eval_sizes}
    final = summary["size_schedule"]["sizes"][-1]
    tc = TeacherCache.open(cache)
    recipe = ViewRecipe.from_dict(tc.spec.recipe)
    seeds = sorted(tc.complete_seeds())
    seed = seeds[(len(summary["size_schedule"]["sizes"]) - 1) % len(seeds)]     # the last epoch's views (cycle)
    train = ds.split("train")
    loader = ReplayLoader(train.beton_path, train.num_samples, final, cfg["batch_size"], workers, order="random",
                          seed=cfg["seed"], drop_last=True, layout=ParamLayout.of(recipe), view_size=recipe.size)
    loader.set_views(read_slab(tc, seed).params)
    out["bn_images"] = recompute_bn_stats(model, (b[0] for b in loader), normalize, bn_images)
    out["last_size"] = final
    out["top1 precise BN"] = evaluate(model, eval_loader(val, final, 256, workers, crop_ratio=cfg["crop_pct"]),
                                      normalize, cpu)["top1"]
    return out


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
    p.add_argument("--variant", action="append", default=[], metavar="ARGS",
                   help="one more student: train-student arguments, e.g. '--size 16:32 --ramp-end 8' (repeatable; "
                        "trained after the --sizes students, with --size-step unless it names one)")
    p.add_argument("--seeds", default="0", help="comma-separated student seeds (--seed: initialisation and order)")
    p.add_argument("--batch-size", type=int, default=128, help="the students' batch size")
    p.add_argument("--no-step-ms", action="store_true", help="skip the per-size train-step timing (compute estimate)")
    p.add_argument("--diagnose", action="store_true",
                   help="also evaluate each student at --eval-sizes, and at its last size with BN statistics "
                        "re-estimated there (--bn-images training views); steps and learning rate at the last size")
    p.add_argument("--eval-sizes", default="16,24,32")
    p.add_argument("--bn-images", type=int, default=512)
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
    variants = [["--size", size] for size in args.sizes.split(",") if size]
    variants += [shlex.split(v) for v in args.variant]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for variant in variants:
        for seed in seeds:
            run = out / _run_name(variant, seed)
            rows.append(student(kd, run, data, cache, args, variant, seed, dev))
            if args.diagnose:
                d = run / f"diagnose-{args.eval_sizes.replace(',', '-')}-bn{args.bn_images}.json"
                if not d.exists():
                    d.write_text(json.dumps(diagnose(run, data, cache, [int(x) for x in args.eval_sizes.split(",")],
                                                     args.bn_images), indent=1))
                rows[-1]["diagnose"] = {**json.loads(d.read_text()), **final_size(run)}
    ms = step_ms(args.model, sorted({s for r in rows for s in r["sizes"]})) if not args.no_step_ms else {}
    for r in rows:   # the schedule's model compute: steps per epoch x ms per step at the epoch's size
        r["compute_s"] = sum(ms[s] for s in r["sizes"]) * r["steps"] / args.epochs / 1000 if ms else None
    teacher_top1 = json.loads((teacher / "summary.json").read_text())["final_top1"]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
              "args": {k: str(v) for k, v in vars(args).items()}, "teacher_top1": teacher_top1, "rows": rows,
              "step_ms": ms, "seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\nteacher resnet10t: {teacher_top1:.2f} %; students {args.model}, cached KD, {args.epochs} epochs, "
          f"batch {args.batch_size}, views 32 px {' '.join(map(str, views))}, val at {rows[0]['val_res']} px")
    if ms:
        print("student train step, batch 128 (CPU ms, fastest of interleaved rounds): "
              + ", ".join(f"{s} px {v:.1f}" for s, v in ms.items()))
    base, cbase, ubase = rows[0]["train_s"], rows[0]["compute_s"], rows[0]["cpu_s"]
    print("| student | seed | size per epoch | val top-1 (%) | training s (sum of epochs) | vs first | run wall s "
          "(with eval, compile) | run CPU s | vs first | model compute CPU s (est.) | vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        compute = f"{r['compute_s']:.1f} | {r['compute_s'] / cbase:.2f}x" if ms else "- | -"
        print(f"| {r['student']} | {r['seed']} | {_runs(r['sizes'])} | {r['top1']:.2f} | {r['train_s']:.1f} | "
              f"{r['train_s'] / base:.2f}x | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['cpu_s'] / ubase:.2f}x | "
              f"{compute} |")
    if args.diagnose:
        keys = [k for k in rows[0]["diagnose"] if k.startswith("top1@")]
        print("\n| student | seed | size per epoch | " + " | ".join(f"val {k[5:]} px" for k in keys)
              + " | val, last size, precise BN | steps at the last size | lr there (x peak) | share of the summed lr |")
        print("|---" * (len(keys) + 7) + "|")
        for r in rows:
            d = r["diagnose"]
            print(f"| {r['student']} | {r['seed']} | {_runs(r['sizes'])} | " + " | ".join(f"{d[k]:.2f}" for k in keys)
                  + f" | {d['top1 precise BN']:.2f} | {d['steps']} | {d['lr_start']:.3f} | {d['lr_share']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
