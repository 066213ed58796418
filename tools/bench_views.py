#!/usr/bin/env python
"""Benchmark of views: parameter generation rate, and loader throughput of
  (a) kdcache's FFCV replay loader (stored view parameters, kdcache.augment.loader.ReplayLoader), renderer 2
      (area resample; new caches), and (a1) the same with renderer 1 (OpenCV INTER_AREA; older caches),
  (b) stock FFCV (RandomResizedCropRGBImageDecoder + RandomHorizontalFlip): the limit for (a),
  (c) a torchvision DataLoader (PIL decode + RandomResizedCrop + RandomHorizontalFlip),
  (d) with --a2: the replay loader with VanillaKD's A2 augmentation (RandAugment rand-m7-mstd0.5, mixup 0.1,
      cutmix 1.0, pairs in one batch): the cost of RandAugment and mixing over (a) (goal (d)/(a) >= 0.80),
on the same prepared data, output size, batch size and worker count. Epochs of all loaders are interleaved
so that machine noise hits them alike; the first epoch of each (JIT) is not timed. Goals: (a)/(b) >= 1.3
at 224 px (issue 11), (d)/(a) >= 0.80.

    python tools/bench_views.py --data data/fashion-mnist            # prepared dataset
    python tools/bench_views.py                                      # prepares Fashion-MNIST in a temp dir
    python tools/bench_views.py --data D --a2                        # adds (d)
"""

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def param_rate(n: int, repeats: int = 3) -> float:
    from kdcache.augment import ViewRecipe, view_params
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(200, 500, n), rng.integers(200, 500, n)
    best = float("inf")
    for seed in range(repeats):
        t = time.perf_counter()
        view_params(ViewRecipe(), 0, seed, np.arange(n), heights, widths)
        best = min(best, time.perf_counter() - t)
    return n / best, best


def replay_epochs(split, recipe, args):
    from kdcache.augment import ParamLayout, view_params
    from kdcache.augment.loader import ReplayLoader
    loader = ReplayLoader(split.beton_path, split.num_samples, recipe.size, args.batch_size, args.workers,
                          order="random", seed=0, indices=args.indices, layout=ParamLayout.of(recipe))
    everyone = np.arange(split.num_samples)
    epoch = 0
    while True:  # parameters are generated outside the timed epoch (their rate is measured separately)
        loader.set_views(view_params(recipe, 0, epoch, everyone, split.sizes[:, 0], split.sizes[:, 1],
                                     split.num_samples))
        yield loader
        epoch += 1


def stock_ffcv_epochs(split, recipe, args):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
    from kdcache.augment.loader import usable_workers
    loader = Loader(str(split.beton_path), batch_size=args.batch_size, num_workers=usable_workers(args.workers),
                    order=OrderOption.RANDOM, seed=0, indices=args.indices,
                    pipelines={"image": [RandomResizedCropRGBImageDecoder((recipe.size,) * 2, recipe.scale, recipe.ratio),
                                         RandomHorizontalFlip(recipe.hflip), ToTensor(), ToTorchImage()],
                               "label": [IntDecoder(), ToTensor(), Squeeze(1)],
                               "index": [IntDecoder(), ToTensor(), Squeeze(1)]})
    while True:
        yield loader


class _TorchvisionViews(torch.utils.data.Dataset):
    """The same canonical JPEG bytes, decoded with PIL and augmented with torchvision."""

    def __init__(self, split, recipe, indices):
        import torchvision.transforms as T
        self.split, self.indices = split, indices
        self.reader = split.jpeg_reader()
        self.transform = T.Compose([T.RandomResizedCrop(recipe.size, recipe.scale, recipe.ratio),
                                    T.RandomHorizontalFlip(recipe.hflip), T.PILToTensor()])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        import io
        from PIL import Image
        i = int(self.indices[j])
        image = Image.open(io.BytesIO(self.reader[i])).convert("RGB")
        return self.transform(image), int(self.split.labels[i]), i


def torchvision_epochs(split, recipe, args):
    indices = args.indices if args.indices is not None else np.arange(split.num_samples)
    loader = torch.utils.data.DataLoader(_TorchvisionViews(split, recipe, indices), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         persistent_workers=True)
    while True:
        yield loader


def time_epoch(loader) -> tuple:
    t, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += images.shape[0]
    return n, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="prepared dataset (default: prepare Fashion-MNIST in a temp dir)")
    p.add_argument("--size", type=int, default=None, help="output size (default: the dataset's view size)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    p.add_argument("--limit", type=int, default=None, help="use the first N training samples")
    p.add_argument("--param-samples", type=int, default=1_281_167)
    p.add_argument("--a2", action="store_true", help="also time the replay loader with the A2 augmentation (d)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from kdcache.augment import ViewRecipe
    from kdcache.data import sources
    from kdcache.data.dataset import PreparedDataset
    from kdcache.data.prepare import prepare
    if args.data is None:
        args.data = os.path.join(tempfile.mkdtemp(), "fashion-mnist")
        prepare(sources.fashion_mnist(), args.data)
    ds = PreparedDataset.open(args.data)
    split = ds.split("train")
    recipe = ViewRecipe(size=args.size or ds.view_size)
    args.indices = None if args.limit is None else np.arange(min(args.limit, split.num_samples))

    rate, seconds = param_rate(args.param_samples)
    print(f"parameter generation: {args.param_samples} samples in {seconds:.3f} s = {rate / 1e6:.2f} M samples/s")

    makers = {"a_kdcache_replay": replay_epochs, "b_ffcv_stock": stock_ffcv_epochs, "c_torchvision": torchvision_epochs}
    streams = {name: make(split, recipe, args) for name, make in makers.items()}
    makers["a1_kdcache_replay_renderer1"] = replay_epochs
    streams["a1_kdcache_replay_renderer1"] = replay_epochs(split, dataclasses.replace(recipe, renderer=1), args)
    if args.a2:
        a2 = ViewRecipe(size=recipe.size, aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0)
        makers["d_kdcache_replay_a2"] = replay_epochs
        streams["d_kdcache_replay_a2"] = replay_epochs(split, a2, args)
    rates = {name: [] for name in makers}
    for name, stream in streams.items():  # warm-up: JIT compilation, worker start-up, page cache
        time_epoch(next(stream))
    for _ in range(args.epochs):
        for name, stream in streams.items():
            n, seconds = time_epoch(next(stream))
            rates[name].append(n / seconds)
    med = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus {platform.processor()}",
        "torch_threads": torch.get_num_threads(), "data": str(ds.root), "samples": len(args.indices) if args.indices is not None else split.num_samples,
        "size": recipe.size, "batch_size": args.batch_size, "workers": args.workers,
        "param_samples_per_s": rate, "img_per_s": med, "img_per_s_all": rates,
        "replay_over_stock": med["a_kdcache_replay"] / med["b_ffcv_stock"],
        "renderer1_replay_over_stock": med["a1_kdcache_replay_renderer1"] / med["b_ffcv_stock"],
        "stock_over_torchvision": med["b_ffcv_stock"] / med["c_torchvision"],
        "replay_over_torchvision": med["a_kdcache_replay"] / med["c_torchvision"],
    }
    if args.a2:
        result["a2_over_replay"] = med["d_kdcache_replay_a2"] / med["a_kdcache_replay"]
    print(f"\nloader throughput, {result['samples']} samples, {recipe.size}px, batch {args.batch_size}, "
          f"{args.workers} workers, median of {args.epochs} epochs:")
    print("| loader | img/s |\n|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:,.0f} |")
    print(f"\nreplay / stock FFCV = {result['replay_over_stock']:.2f} (goal >= 1.3 at 224 px); "
          f"with renderer 1: {result['renderer1_replay_over_stock']:.2f}")
    print(f"stock FFCV / torchvision = {result['stock_over_torchvision']:.1f}")
    print(f"replay / torchvision = {result['replay_over_torchvision']:.1f}")
    if args.a2:
        print(f"replay with A2 (RandAugment + mixing) / replay = {result['a2_over_replay']:.2f} (goal >= 0.80)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
