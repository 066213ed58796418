"""Where samples come from: Fashion-MNIST (Debian's IDX files), an ImageFolder tree, or timm-style shards.

Each source yields RawSamples per split in its canonical order; the prepared dataset keeps that order,
and a sample's position in it is its global index i.
"""

import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
from braceexpand import braceexpand

from kdcache.data.idx import read_idx
from kdcache.data.keys import escape_key
from kdcache.errors import KdcacheError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # timm's input_key 'jpg;png;webp'


@dataclass
class RawSample:
    key: str
    label: int
    origin: str          # the file (and tar member) it came from, for error messages
    payload: object      # encoded bytes, a pixel array, or a Path read by the worker
    error: Optional[str] = None  # set when the source itself could not provide the sample


@dataclass
class Source:
    kind: str
    description: dict                      # recorded in the manifest; identifies the input
    splits: Dict[str, Callable[[], Iterator[RawSample]]]
    num_classes: Optional[int]             # None: inferred as max label + 1
    class_names: Optional[List[str]] = None
    view_size: int = 224
    max_side: Optional[int] = 500
    counts: Optional[Dict[str, int]] = None   # samples per split, where known up front (progress ETA)


def _limited(make: Callable[[], Iterator[RawSample]], limit: Optional[int]):
    if limit is None:
        return make
    return lambda: itertools.islice(make(), limit)


def fashion_mnist(root: str = FASHION_MNIST_DIR, limit: Optional[int] = None) -> Source:
    root = Path(root)
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def locate(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (root / name).exists():
                return root / name
        raise KdcacheError(f"{root / (stem + '.gz')}: Fashion-MNIST file not found "
                           "(apt-get install dataset-fashion-mnist, or pass --root)")

    def split_iter(split: str) -> Callable[[], Iterator[RawSample]]:
        img_path, lbl_path = (locate(s) for s in files[split])

        def gen():
            images, labels = read_idx(img_path), read_idx(lbl_path)
            if images.ndim != 3 or len(images) != len(labels):
                raise KdcacheError(f"{img_path}: {images.shape} images do not match {len(labels)} labels in {lbl_path}")
            for j in range(len(labels)):
                yield RawSample(key=f"{split}_{j:06d}", label=int(labels[j]),
                                origin=f"{img_path}[{j}]", payload=images[j])
        return gen

    splits = {s: _limited(split_iter(s), limit) for s in files}
    counts = {s: _idx_count(locate(files[s][1]), limit) for s in files}
    return Source(kind="fashion-mnist", description={"kind": "fashion-mnist", "root": str(root), "limit": limit},
                  splits=splits, num_classes=10, class_names=list(FASHION_MNIST_CLASSES),
                  view_size=32, max_side=None, counts=counts)


def _idx_count(path: Path, limit: Optional[int]) -> Optional[int]:
    """The item count in an IDX file's header (None where it cannot be read: prepare reports that)."""
    import gzip
    import struct
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            n = struct.unpack(">I", f.read(8)[4:8])[0]
    except (OSError, struct.error):
        return None
    return n if limit is None else min(n, limit)


def imagefolder(root: str, limit: Optional[int] = None, view_size: int = 224,
                shuffle_seed: Optional[int] = None) -> Source:
    """shuffle_seed: the train split's canonical order is a permutation of the class-sorted listing. Mixing
    recipes pair samples inside blocks of consecutive indices, so a class-sorted order would pair a class
    with itself (docs/views.md)."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise KdcacheError(f"{train_dir}: not a directory (expected ROOT/train/<class>/<image> and ROOT/val/<class>/<image>)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not classes:
        raise KdcacheError(f"{train_dir}: no class folders found")
    class_to_label = {c: j for j, c in enumerate(classes)}

    def split_iter(split_dir: Path) -> Callable[[], Iterator[RawSample]]:
        def gen():
            for cls in sorted(d.name for d in split_dir.iterdir() if d.is_dir()):
                if cls not in class_to_label:
                    raise KdcacheError(f"{split_dir / cls}: class folder not present in {train_dir}")
                for path in sorted((split_dir / cls).iterdir()):
                    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                        # the path below the split folder: the class folder and the whole file name
                        yield RawSample(key=escape_key(f"{cls}/{path.name}"), label=class_to_label[cls],
                                        origin=str(path), payload=path)
        return gen

    train = split_iter(train_dir)
    if shuffle_seed is not None:
        listed = train

        def train():  # the listing is file names only: holding it whole is cheap even for ImageNet
            items = list(listed())
            for j in np.random.default_rng(shuffle_seed).permutation(len(items)):
                yield items[j]
    splits = {"train": _limited(train, limit)}
    if (root / "val").is_dir():
        splits["val"] = _limited(split_iter(root / "val"), limit)
    return Source(kind="imagefolder", description={"kind": "imagefolder", "root": str(root.resolve()), "limit": limit,
                                                   **({"shuffle_seed": shuffle_seed} if shuffle_seed is not None else {})},
                  splits=splits, num_classes=len(classes), class_names=classes, view_size=view_size)


def expand_shards(pattern: str) -> List[str]:
    """Brace patterns ({0000..1023}) and local globs, sorted by name: the canonical shard order."""
    paths = []
    for part in braceexpand(pattern):
        hits = glob.glob(part)
        if not hits and not glob.has_magic(part):
            raise KdcacheError(f"{part}: shard not found (from pattern {pattern!r})")
        paths.extend(hits)
    paths = sorted(set(paths), key=lambda p: (os.path.basename(p), p))
    if not paths:
        raise KdcacheError(f"{pattern!r}: no shards match")
    return paths


def _iter_wds(shards: List[str]) -> Iterator[RawSample]:
    import tarfile
    from kdcache.data.tar_samples import DamagedShard, iter_tar_samples
    for shard in shards:
        try:
            for key, sample in iter_tar_samples(shard):
                origin = f"{shard}:{key}"
                image_key = next((k for k in WDS_IMAGE_KEYS if k in sample), None)
                error = None
                label = -1
                if image_key is None:
                    error = f"no image member (looked for {', '.join(WDS_IMAGE_KEYS)})"
                try:
                    label = int(sample["cls"])
                except (KeyError, ValueError) as exc:
                    error = error or f"no valid 'cls' label ({exc!r})"
                yield RawSample(key=escape_key(key), label=label, origin=origin,
                                payload=sample.get(image_key), error=error)
        except DamagedShard as exc:
            if exc.key is None:
                raise KdcacheError(f"{shard}: cannot read shard: {exc.reason}") from None
            # the broken sample, like any bad one: an error naming shard and key, or skipped with --skip-bad
            yield RawSample(key=escape_key(exc.key), label=-1, origin=f"{shard}:{exc.key}", payload=None,
                            error=exc.reason)
        except (OSError, tarfile.ReadError) as exc:   # missing, unreadable, or no tar at all
            raise KdcacheError(f"{shard}: cannot read shard: {exc}") from None


def wds(pattern: str, val_pattern: Optional[str] = None, num_classes: Optional[int] = None,
        limit: Optional[int] = None, view_size: int = 224) -> Source:
    train_shards = expand_shards(pattern)
    splits = {"train": _limited(lambda: _iter_wds(train_shards), limit)}
    description = {"kind": "wds", "train": [os.path.abspath(p) for p in train_shards], "limit": limit}
    if val_pattern:
        val_shards = expand_shards(val_pattern)
        splits["val"] = _limited(lambda: _iter_wds(val_shards), limit)
        description["val"] = [os.path.abspath(p) for p in val_shards]
    return Source(kind="wds", description=description, splits=splits, num_classes=num_classes,
                  view_size=view_size)
