#!/usr/bin/env python
"""img/s of the map-style dataset (kdcache.student.dataset.ReplayDataset in a torch DataLoader, worker processes,
PairBatchSampler + collate_views) against the FFCV replay loader (kdcache.augment.loader.ReplayLoader, worker
threads), on the same prepared data, views, output size, batch size and worker count: Fashion-MNIST at 32 px
and a synthetic ImageNet-shaped imagefolder (tools/make_synthetic_imagefolder.py) at 224 px. Both render the
same pixels (tests/test_torch_dataset.py). Epochs of the two loaders alternate, so that machine noise hits
them alike; each loader's first epoch (JIT, worker start) is not timed. Goal at 224 px: the dataset at least
0.6x the FFCV replay. The compute calibration (tools/calibrate.py) is printed first.

    python tools/bench_torch_dataset.py                       # both datasets, RRC + flip views
    python tools/bench_torch_dataset.py --recipe a2           # RandAugment, erasing, mixup/cutmix views
    python tools/bench_torch_dataset.py --fmnist 2000 --synthetic 640 --epochs 3 --json out.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECIPES = {"rrc": {}, "a2": dict(aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, reprob=0.25, mix_block=256)}


def prepare_fmnist(out: Path, n: int):
    from kdcache.data import sources
    from kdcache.data.prepare import prepare
    return prepare(sources.fashion_mnist(limit=n), out / "fm", workers=2)


def prepare_synthetic(out: Path, n: int):
    from kdcache.data import sources
    from kdcache.data.prepare import prepare
    per_class = max(1, n // 10)
    subprocess.run([sys.executable, str(HERE / "make_synthetic_imagefolder.py"), str(out / "src"), "--classes", "10",
                    "--per-class", str(per_class), "--val-per-class", "1", "--workers", "2"], check=True)
    return prepare(sources.imagefolder(str(out / "src"), view_size=224), out / "syn", workers=2)


def ffcv_epochs(ds, recipe, args):
    """Yields the time of one epoch of the FFCV replay loader, views of seed e for epoch e."""
    from kdcache.augment import ParamLayout, view_params
    from kdcache.augment.loader import ReplayLoader
    split = ds.split("train")
    n = split.num_samples
    loader = ReplayLoader(split.beton_path, n, recipe.size, args.batch_size, args.workers, order="random", seed=0,
                          layout=ParamLayout.of(recipe))
    epoch = 0
    while True:
        loader.set_views(view_params(recipe, 0, epoch, np.arange(n), split.sizes[:, 0], split.sizes[:, 1], n))
        t, images = time.perf_counter(), 0
        for batch in loader:
            images += batch[0].shape[0]
        yield images, time.perf_counter() - t
        epoch += 1


def dataset_epochs(ds, recipe, args, mix="batch"):
    """Yields the time of one epoch of ReplayDataset in a DataLoader (persistent workers: set_epoch reaches
    them through shared memory). mix="item" renders each mixed view's partner in __getitem__ too."""
    from torch.utils.data import DataLoader
    from kdcache.student.dataset import PairBatchSampler, ReplayDataset, collate_views
    dataset = ReplayDataset(ds.root, recipe=recipe, mix=mix)
    sampler = PairBatchSampler(dataset, args.batch_size, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_views, num_workers=args.workers,
                        persistent_workers=True, prefetch_factor=4)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        t, images = time.perf_counter(), 0
        for batch in loader:
            images += batch.images.shape[0]
        yield images, time.perf_counter() - t
        epoch += 1


def measure(ds, recipe, args) -> dict:
    runs = {"ffcv_replay": ffcv_epochs(ds, recipe, args), "torch_dataset": dataset_epochs(ds, recipe, args)}
    if recipe.mixing:   # the cost of mixing in __getitem__ (any sampler) over mixing in the batch
        runs["torch_dataset_mix_item"] = dataset_epochs(ds, recipe, args, mix="item")
    rates = {name: [] for name in runs}
    for name, epochs in runs.items():
        next(epochs)                                  # JIT and worker start, not timed
    for _ in range(args.epochs):
        for name, epochs in runs.items():
            images, seconds = next(epochs)
            rates[name].append(images / seconds)
    out = {name: statistics.median(r) for name, r in rates.items()}
    out["ratio"] = out["torch_dataset"] / out["ffcv_replay"]
    if "torch_dataset_mix_item" in out:
        out["ratio_mix_item"] = out["torch_dataset_mix_item"] / out["ffcv_replay"]
    out["all"] = rates
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fmnist", type=int, default=1000, help="Fashion-MNIST train samples at 32 px (0: skip)")
    p.add_argument("--synthetic", type=int, default=320, help="synthetic 224 px train images (0: skip)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="rrc", help="views: rrc (crop + flip) or a2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="FFCV threads and DataLoader processes alike")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (median reported)")
    p.add_argument("--tmp", type=Path, default=None, help="where to prepare the data (default: a temporary dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    calibration = subprocess.run([sys.executable, str(HERE / "calibrate.py")], capture_output=True, text=True,
                                 check=True).stdout.strip()
    print(calibration, flush=True)
    from kdcache.augment import ViewRecipe
    results = {"calibration": calibration, "recipe": args.recipe, "batch_size": args.batch_size,
               "workers": args.workers, "runs": {}}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name, n, size, make in (("fashion-mnist", args.fmnist, 32, prepare_fmnist),
                                    ("synthetic", args.synthetic, 224, prepare_synthetic)):
            if not n:
                continue
            ds = make(Path(tmp), n)
            r = measure(ds, ViewRecipe(size=size, **RECIPES[args.recipe]), args)
            results["runs"][f"{name} {size} px"] = dict(r, samples=ds.split("train").num_samples)
            print(f"{name} {size} px, {ds.split('train').num_samples} img, {args.recipe}: FFCV replay "
                  f"{r['ffcv_replay']:.0f} img/s, torch dataset {r['torch_dataset']:.0f} img/s, "
                  f"ratio {r['ratio']:.2f}" + (f"; mix='item' {r['torch_dataset_mix_item']:.0f} img/s, ratio "
                                              f"{r['ratio_mix_item']:.2f}" if "ratio_mix_item" in r else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
